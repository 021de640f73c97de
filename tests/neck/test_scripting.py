"""
The neck stays TorchScript-friendly like Detectron2's FPN: for every variant,
``torch.jit.script`` (through ``__prepare_scriptable__``, as Detectron2 does for its FPN) and
``torch.jit.trace`` give the eager pyramid, with input sizes other than the traced one too.
"""
import copy

import pytest
import torch
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import ResNet
from jit_testutils import script, trace
from neck_testutils import VARIANTS, padded, tiny_cfg, toy_cfg, variant_id
from torch import nn

# Every variant, and combinations of them.
CASES = VARIANTS + [
    {"FUSE_TYPE": "avg", "TOP_BLOCK": "none"},
    {"FUSE_TYPE": "weighted", "BOTTOM_UP_PATH": True, "UPSAMPLE_MODE": "bilinear",
     "TOP_BLOCK": "p6p7_p5"},
    {"TOP_BLOCK": "p6p7_res5", "NORM": "GN"},
    {"IN_FEATURES": ["res5"]},
    {"IN_FEATURES": ["res5"], "BOTTOM_UP_PATH": True, "FUSE_TYPE": "weighted"},
]
SIZES = [(64, 96), (96, 32)]


def _assert_same(eager, other, x):
    """Bit-identical pyramids: scripting and tracing run the same ops on the same inputs (as
    the deploy tests require of the whole model), so no tolerance is needed."""
    with torch.no_grad():
        a, b = eager(x), other(x)
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize("fpn_keys", CASES, ids=[variant_id(k) for k in CASES])
def test_script_matches_eager(fpn_keys):
    if fpn_keys.get("NORM") == "SyncBN":
        pytest.skip("torch's nn.SyncBatchNorm cannot be scripted (its forward calls "
                    "torch.distributed), in Detectron2's FPN as here; nothing converts it: "
                    "script a BN/FrozenBN/GN config (docs/deploy.md). "
                    "test_script_refuses_sync_bn checks the limitation.")
    torch.manual_seed(0)
    model = build_backbone(toy_cfg(**fpn_keys)).eval()
    keys = list(model.state_dict())
    scripted = script(model)
    for hw in SIZES:
        _assert_same(model, scripted, torch.randn(2, 3, *hw))
    # Scripting works on a copy: the eager module keeps Detectron2's parameter names.
    assert list(model.state_dict()) == keys
    assert any(k.startswith("fpn_lateral") for k in keys)


@pytest.mark.parametrize("fpn_keys", CASES, ids=[variant_id(k) for k in CASES])
def test_trace_matches_eager_at_other_sizes(fpn_keys):
    torch.manual_seed(0)
    model = build_backbone(toy_cfg(**fpn_keys)).eval()
    # no_grad: Detectron2's FrozenBatchNorm2d branches on requires_grad, which would make
    # the tracer's re-run check see a different graph.
    with torch.no_grad():
        traced = trace(model, torch.randn(2, 3, *SIZES[0]))
    for hw in SIZES:
        _assert_same(model, traced, torch.randn(1, 3, *hw))


def test_script_refuses_sync_bn():
    """The documented limitation behind the SyncBN skip above: scripting fails (it does not
    silently produce a module that would need a process group at inference)."""
    model = build_backbone(toy_cfg(NORM="SyncBN")).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(Exception):
        script(model)


def _prepare_resnet(self):
    # What Detectron2 main registers for ResNet when detectron2.export is imported (its
    # stages are a plain list); v0.6's detectron2.export cannot be imported here.
    ret = copy.deepcopy(self)
    ret.stages = nn.ModuleList(ret.stages)
    for k in self.stage_names:
        delattr(ret, k)
    return ret


def test_script_resnet_neck_matches_eager(monkeypatch):
    if not hasattr(ResNet, "__prepare_scriptable__"):
        monkeypatch.setattr(ResNet, "__prepare_scriptable__", _prepare_resnet, raising=False)
    torch.manual_seed(0)
    model = build_backbone(tiny_cfg()).eval()
    _assert_same(model, script(model), padded([torch.randn(3, 45, 77)], 32))


def test_trace_resnet_neck_generalizes_to_other_sizes():
    torch.manual_seed(0)
    model = build_backbone(tiny_cfg(BOTTOM_UP_PATH=True)).eval()
    with torch.no_grad():
        traced = trace(model, torch.randn(1, 3, 32, 64))
    _assert_same(model, traced, torch.randn(1, 3, 32, 64))
    _assert_same(model, traced, padded([torch.randn(3, 67, 29)], 32))
