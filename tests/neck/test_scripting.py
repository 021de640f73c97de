"""
The neck stays TorchScript-friendly like Detectron2's FPN: ``torch.jit.script`` (through
``__prepare_scriptable__``, as Detectron2 does for its FPN) and ``torch.jit.trace`` give the
eager pyramid, with input sizes other than the traced one too.
"""
import copy
import warnings

import pytest
import torch
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import ResNet
from neck_testutils import padded, tiny_cfg, toy_cfg
from torch import nn


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        return torch.jit.script(model)


def _assert_same(eager, other, x):
    with torch.no_grad():
        a, b = eager(x), other(x)
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize(
    "fpn_keys",
    [
        {},
        {"FUSE_TYPE": "avg", "TOP_BLOCK": "none"},
        {"FUSE_TYPE": "weighted", "BOTTOM_UP_PATH": True, "UPSAMPLE_MODE": "bilinear",
         "TOP_BLOCK": "p6p7_p5"},
        {"TOP_BLOCK": "p6p7_res5", "NORM": "GN"},
        {"IN_FEATURES": ["res5"]},
    ],
    ids=["parity", "avg-no-top", "panet-weighted-bilinear-p6p7", "p6p7_res5-GN", "one-level"],
)
def test_script_matches_eager(fpn_keys):
    torch.manual_seed(0)
    model = build_backbone(toy_cfg(**fpn_keys)).eval()
    scripted = _script(model)
    for hw in [(64, 96), (96, 32)]:
        _assert_same(model, scripted, torch.randn(2, 3, *hw))
    # Scripting works on a copy: the eager module keeps Detectron2's parameter names.
    assert "fpn_lateral5.weight" in model.state_dict()


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
    _assert_same(model, _script(model), padded([torch.randn(3, 45, 77)], 32))


def test_trace_resnet_neck_generalizes_to_other_sizes():
    torch.manual_seed(0)
    model = build_backbone(tiny_cfg(BOTTOM_UP_PATH=True)).eval()
    # no_grad: Detectron2's FrozenBatchNorm2d branches on requires_grad, which would make
    # the tracer's re-run check see a different graph.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes about dict outputs
        traced = torch.jit.trace(model, torch.randn(1, 3, 32, 64), strict=False)
    _assert_same(model, traced, torch.randn(1, 3, 32, 64))
    _assert_same(model, traced, padded([torch.randn(3, 67, 29)], 32))
