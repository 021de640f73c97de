"""
BiFPN (fpn_plugin.neck.bifpn): a cell computes the nodes its docstring writes out, one cell
connects every input level to every output level (a top-down FPN does not), the depthwise-
separable node convs, the keys it has and lacks, its validation, scripting and tracing, and
what holds in place of parity with Detectron2's FPN (there is no setting in which they agree:
with 0 cells the neck is Detectron2's lateral convs and the top block, computed bit for bit).
"""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from jit_testutils import script, trace
from neck_testutils import padded, tiny_cfg, toy_cfg

from fpn_plugin.layers import SumFusion, WeightedFusion
from fpn_plugin.neck import BiFPN, CustomFPN
from fpn_plugin.neck.bifpn import BiFPNCell, SeparableConv3x3


def _levels(channels=8, sizes=((16, 24), (8, 12), (4, 6)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, h, w, generator=g) for h, w in sizes]


def _spread_fusion_weights_(cell):
    with torch.no_grad():
        for fusion in (cell.td_fusion, cell.mid_fusion, cell.top_fusion):
            fusion.weight.uniform_(0.2, 2.0)
        cell.mid_fusion.weight[0, 1] = -1.0  # a negative raw weight counts as zero


def test_cell_computes_the_documented_nodes():
    torch.manual_seed(0)
    cell = BiFPNCell(3, 8, norm="", fuse_type="weighted", upsample_mode="nearest").eval()
    _spread_fusion_weights_(cell)

    def fuse(fusion, node, *xs):
        w = F.relu(fusion.weight[node])
        return sum(wi * x for wi, x in zip(w, xs)) / (w.sum() + 1e-4)

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def down(x):
        return F.max_pool2d(x, 3, stride=2, padding=1)

    p0, p1, p2 = _levels()
    with torch.no_grad():
        ours = cell([p0, p1, p2])
        # Written out for three levels (the docstring's formulas).
        t2 = p2
        t1 = cell.td_convs[0](fuse(cell.td_fusion, 0, p1, up(t2, p1)))
        t0 = cell.td_convs[1](fuse(cell.td_fusion, 1, p0, up(t1, p0)))
        o0 = t0
        o1 = cell.mid_convs[0](fuse(cell.mid_fusion, 0, p1, t1, down(o0)))
        o2 = cell.top_conv(fuse(cell.top_fusion, 0, p2, down(o1)))
    assert [t.shape for t in ours] == [p0.shape, p1.shape, p2.shape]
    for a, b in zip(ours, [o0, o1, o2]):
        assert torch.allclose(a, b, atol=1e-6)


def _dependence(model_fn, levels):
    """dep[i][j]: does output level i depend on input level j (non-zero gradient)?"""
    levels = [x.clone().requires_grad_(True) for x in levels]
    outs = model_fn(levels)
    dep = []
    for out in outs:
        grads = torch.autograd.grad(out.sum(), levels, retain_graph=True, allow_unused=True)
        dep.append([g is not None and bool(g.abs().sum() > 0) for g in grads])
    return dep


def test_one_cell_connects_every_input_level_to_every_output_level():
    torch.manual_seed(0)
    cell = BiFPNCell(4, 8).eval()
    sizes = ((32, 32), (16, 16), (8, 8), (4, 4))
    dep = _dependence(cell, _levels(sizes=sizes))
    assert all(all(row) for row in dep), dep

    # A top-down FPN on the same levels does not: its coarsest output never sees the finest.
    fpn = CustomFPN(_IdentityLevels(8, 4), ["c2", "c3", "c4", "c5"], 8, top_block=None).eval()

    def fpn_fn(levels):
        feats = {f"c{i + 2}": x for i, x in enumerate(levels)}
        return fpn._top_down(feats)

    fpn_dep = _dependence(fpn_fn, _levels(sizes=sizes))
    assert not fpn_dep[3][0] and fpn_dep[0][3]


class _IdentityLevels(torch.nn.Module):
    """Declares C channels at strides 4..32 for a neck whose _top_down is called directly."""

    def __init__(self, channels, num):
        super().__init__()
        from detectron2.layers import ShapeSpec

        self._shapes = {f"c{i + 2}": ShapeSpec(channels=channels, stride=2 ** (i + 2))
                        for i in range(num)}

    def output_shape(self):
        return self._shapes


def test_node_conv_is_depthwise_separable_with_norm_and_swish():
    conv = SeparableConv3x3(32, norm="GN")
    assert conv.depthwise.groups == 32 and conv.depthwise.kernel_size == (3, 3)
    assert conv.depthwise.bias is None
    assert conv.pointwise.kernel_size == (1, 1) and conv.pointwise.bias is None
    assert isinstance(conv.pointwise.norm, torch.nn.GroupNorm)
    assert isinstance(conv.pointwise.activation, torch.nn.SiLU)
    # 9C + C^2 weights (+ the norm's 2C): the depthwise-separable count, not a 3x3's 9C^2.
    assert sum(p.numel() for p in conv.parameters()) == 9 * 32 + 32 * 32 + 2 * 32
    plain = SeparableConv3x3(8)
    assert plain.pointwise.bias is not None and plain.pointwise.norm is None
    x = torch.randn(1, 8, 5, 7)
    with torch.no_grad():
        ref = F.silu(F.conv2d(F.conv2d(x, plain.depthwise.weight, padding=1, groups=8),
                              plain.pointwise.weight, plain.pointwise.bias))
        assert torch.allclose(plain(x), ref, atol=1e-6)


def test_keys_cells_and_fusions():
    torch.manual_seed(0)
    model = build_backbone(tiny_cfg(**{"BIFPN.ENABLED": True, "FUSE_TYPE": "weighted"}))
    assert isinstance(model, BiFPN) and len(model.cells) == 3
    keys = set(model.state_dict())
    assert {f"fpn_lateral{s}.weight" for s in (2, 3, 4, 5)} <= keys
    assert not any(k.startswith(("fpn_output", "top_down_fusion")) for k in keys)
    cell = model.cells[0]
    assert cell.td_fusion.weight.shape == (3, 2)  # 3 top-down nodes x (input, upsampled)
    assert cell.mid_fusion.weight.shape == (2, 3)  # 2 intermediate bottom-up nodes x 3 inputs
    assert cell.top_fusion.weight.shape == (1, 2)
    assert len(cell.td_convs) == 3 and len(cell.mid_convs) == 2
    unweighted = build_backbone(tiny_cfg(**{"BIFPN.ENABLED": True, "FUSE_TYPE": "sum"}))
    assert isinstance(unweighted.cells[0].td_fusion, SumFusion)
    assert not any("fusion" in k for k in unweighted.state_dict())
    two = build_backbone(toy_cfg(**{"BIFPN.ENABLED": True, "FUSE_TYPE": "weighted",
                                    "IN_FEATURES": ["res4", "res5"]}))
    assert two.cells[0].mid_fusion is None and isinstance(two.cells[0].top_fusion, WeightedFusion)


def test_zero_cells_is_detectron2s_lateral_convs_and_top_block():
    """No parity with Detectron2's FPN exists; what holds: its lateral and backbone weights
    load, and with 0 cells the pyramid is exactly its lateral convs' maps, P6 pooled from P5."""
    cfg = tiny_cfg(**{"BIFPN.ENABLED": True, "BIFPN.NUM_CELLS": 0})
    torch.manual_seed(0)
    d2 = build_resnet_fpn_backbone(cfg, _input_shape()).eval()
    ours = build_backbone(cfg).eval()
    result = ours.load_state_dict(d2.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == sorted(
        f"fpn_output{s}.{w}" for s in (2, 3, 4, 5) for w in ("weight", "bias"))
    x = padded([torch.randn(3, 67, 45)], ours.size_divisibility)
    with torch.no_grad():
        out = ours(x)
        feats = d2.bottom_up(x)
        for stage, conv in zip((2, 3, 4, 5), reversed(d2.lateral_convs)):
            assert torch.equal(out[f"p{stage}"], conv(feats[f"res{stage}"])), stage
        assert torch.equal(out["p6"], F.max_pool2d(out["p5"], kernel_size=1, stride=2))
        theirs = d2(x)
    assert list(out) == list(theirs)
    assert not torch.allclose(out["p2"], theirs["p2"])  # not Detectron2's FPN, as documented


def _input_shape():
    from detectron2.layers import ShapeSpec

    return ShapeSpec(channels=3)


@pytest.mark.parametrize("keys", [
    {"FUSE_TYPE": "weighted"},
    {"BIFPN.NUM_CELLS": 2, "NORM": "BN", "UPSAMPLE_MODE": "bilinear", "TOP_BLOCK": "p6p7_p5"},
], ids=["weighted", "bn-bilinear-p6p7"])
def test_script_and_trace_equal_eager(keys):
    torch.manual_seed(0)
    model = build_backbone(toy_cfg(**{"BIFPN.ENABLED": True, **keys})).eval()
    scripted = script(model)
    with torch.no_grad():
        traced = trace(model, torch.randn(1, 3, 64, 96))
    for hw in ((64, 96), (96, 32)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want, got_s, got_t = model(x), scripted(x), traced(x)
        assert list(want) == list(got_s) == list(got_t)
        for k in want:
            assert torch.equal(want[k], got_s[k]), k
            assert torch.equal(want[k], got_t[k]), k


@pytest.mark.parametrize("keys, fragments", [
    ({"BIFPN.NUM_CELLS": -1}, ["MODEL.FPN.BIFPN.NUM_CELLS", "-1"]),
    ({"BIFPN.NUM_CELLS": True}, ["MODEL.FPN.BIFPN.NUM_CELLS", "True"]),
    ({"IN_FEATURES": ["res5"]}, ["MODEL.FPN.BIFPN.NUM_CELLS", "MODEL.FPN.IN_FEATURES"]),
    ({"BOTTOM_UP_PATH": True}, ["MODEL.FPN", "BOTTOM_UP_PATH", "BIFPN.ENABLED"]),
])
def test_invalid_settings_name_their_keys(keys, fragments):
    with pytest.raises(ValueError) as info:
        build_backbone(toy_cfg(**{"BIFPN.ENABLED": True, **keys}))
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_switch_must_be_a_bool():
    with pytest.raises(ValueError, match="MODEL.FPN.BIFPN.ENABLED='yes' must be True or False"):
        build_backbone(toy_cfg(**{"BIFPN.ENABLED": "yes"}))
