"""
Every neck variant: right pyramid shapes on odd, non-square inputs, forward and backward on
CPU, gradients reaching every parameter, the variant computing what it documents, and the
state-dict keys it adds.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_backbone
from neck_testutils import VARIANTS, ToyBackbone, padded, tiny_cfg, toy_cfg, variant_id

from fpn_plugin.neck import CustomFPN, WeightedFusion

def _expected_levels(cfg):
    first = int(cfg.MODEL.FPN.IN_FEATURES[0][-1])
    last = int(cfg.MODEL.FPN.IN_FEATURES[-1][-1])
    extra = {"none": 0, "maxpool": 1, "p6p7_res5": 2, "p6p7_p5": 2}[cfg.MODEL.FPN.TOP_BLOCK]
    return [f"p{s}" for s in range(first, last + extra + 1)]


# Every variant on the toy backbone (fast); a few also on ResNet-18 through the ResNet builder.
CASES = [("toy", keys) for keys in VARIANTS] + [
    ("R18", {}),
    ("R18", {"BOTTOM_UP_PATH": True, "FUSE_TYPE": "weighted", "NORM": "GN"}),
    ("R18", {"IN_FEATURES": ["res3", "res4", "res5"], "TOP_BLOCK": "p6p7_res5"}),
]


@pytest.mark.parametrize(
    "backbone, fpn_keys", CASES, ids=[f"{b}-{variant_id(k)}" for b, k in CASES]
)
def test_variant_forward_backward_shapes_and_gradients(backbone, fpn_keys):
    if backbone == "toy":
        cfg = toy_cfg(**fpn_keys)
    else:
        cfg = tiny_cfg(**fpn_keys)
        cfg.MODEL.RESNETS.OUT_FEATURES = list(cfg.MODEL.FPN.IN_FEATURES)
    torch.manual_seed(0)
    model = build_backbone(cfg).train()
    levels = _expected_levels(cfg)
    shapes = model.output_shape()
    assert list(shapes) == levels
    assert all(shapes[p].stride == 2 ** int(p[1:]) and shapes[p].channels == 32 for p in levels)
    assert isinstance(model.bottom_up, ToyBackbone) == (backbone == "toy")
    assert model.size_divisibility == shapes[levels[len(cfg.MODEL.FPN.IN_FEATURES) - 1]].stride

    x = padded([torch.randn(3, 37, 53), torch.randn(3, 45, 29)], model.size_divisibility)
    out = model(x)
    assert list(out) == levels
    for p, t in out.items():
        stride = shapes[p].stride
        assert t.shape == (2, 32, math.ceil(x.shape[2] / stride), math.ceil(x.shape[3] / stride)), p
        assert torch.isfinite(t).all(), p

    loss = sum((t * torch.randn_like(t)).sum() for t in out.values())
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone == "toy":  # the toy's unused last stage (res2..res4 inputs) gets no gradient
        trainable = [(n, p) for n, p in trainable if not n.startswith("bottom_up.")]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached {no_grad}"


def test_variants_add_keys_only_when_enabled():
    torch.manual_seed(0)
    parity = set(build_backbone(tiny_cfg()).state_dict())
    assert not any(k.startswith(("pan_", "top_down_fusion")) for k in parity)
    pan = build_backbone(tiny_cfg(BOTTOM_UP_PATH=True, FUSE_TYPE="weighted")).state_dict()
    added = set(pan) - parity
    assert parity <= set(pan)
    assert added == (
        {f"pan_{kind}{s}.{w}" for kind in ("downsample", "output") for s in (3, 4, 5)
         for w in ("weight", "bias")}
        | {"top_down_fusion.weight", "pan_fusion.weight"}
    )
    assert pan["top_down_fusion.weight"].shape == (3, 2)  # 3 merges x (lateral, top-down)


def _reference_pyramid(neck, feats, fuse, upsample_mode, top_block_from_last_level):
    """An independent, straight-line implementation of the documented computation."""
    names = list(neck.in_features)
    stages = [int(n[-1]) for n in names]
    lat = {s: getattr(neck, f"fpn_lateral{s}")(feats[n]) for n, s in zip(names, stages)}
    merged = {stages[-1]: lat[stages[-1]]}
    for node, s in enumerate(reversed(stages[:-1])):
        up = F.interpolate(merged[s + 1], size=lat[s].shape[-2:], mode=upsample_mode,
                           **({"align_corners": False} if upsample_mode == "bilinear" else {}))
        merged[s] = fuse("top_down", node, lat[s], up)
    p = {s: getattr(neck, f"fpn_output{s}")(merged[s]) for s in stages}
    if hasattr(neck, f"pan_output{stages[1]}"):
        n = {stages[0]: p[stages[0]]}
        for node, s in enumerate(stages[1:]):
            down = getattr(neck, f"pan_downsample{s}")(n[s - 1])
            n[s] = getattr(neck, f"pan_output{s}")(fuse("pan", node, p[s], down))
        p = n
    c = p[stages[-1]] if top_block_from_last_level else feats[names[-1]]
    p6 = neck.top_block.p6(c)
    p7 = neck.top_block.p7(F.relu(p6))
    return [p[s] for s in stages] + [p6, p7]


def test_panet_weighted_bilinear_p6p7_computes_the_documented_pyramid():
    torch.manual_seed(0)
    neck = build_backbone(
        toy_cfg(BOTTOM_UP_PATH=True, FUSE_TYPE="weighted", UPSAMPLE_MODE="bilinear",
                TOP_BLOCK="p6p7_p5")
    ).eval()
    with torch.no_grad():  # distinct weights per node and input
        neck.top_down_fusion.weight.uniform_(0.2, 2.0)
        neck.pan_fusion.weight.uniform_(0.2, 2.0)
        neck.pan_fusion.weight[1, 0] = -1.0  # a negative raw weight counts as zero

    def fuse(path, node, a, b):
        w = F.relu(getattr(neck, f"{path}_fusion").weight[node])
        return (w[0] * a + w[1] * b) / (w.sum() + 1e-4)

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = list(neck(x).values())
        ref = _reference_pyramid(neck, neck.bottom_up(x), fuse, "bilinear", True)
    assert len(ours) == len(ref) == 6
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_upsample_mode_and_fuse_type_change_the_pyramid():
    torch.manual_seed(0)
    base = build_backbone(toy_cfg()).eval()
    x = torch.randn(1, 3, 64, 64)
    ref = base(x)
    for keys in ({"UPSAMPLE_MODE": "bilinear"}, {"FUSE_TYPE": "avg"}):
        other = build_backbone(toy_cfg(**keys)).eval()
        other.load_state_dict(base.state_dict())
        out = other(x)
        assert torch.equal(out["p5"], ref["p5"])  # the coarsest input level has no merge
        assert not torch.allclose(out["p2"], ref["p2"])


def test_top_block_p6p7_res5_reads_the_last_backbone_feature():
    torch.manual_seed(0)
    neck = build_backbone(toy_cfg(TOP_BLOCK="p6p7_res5")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = neck(x)
        p6 = neck.top_block.p6(neck.bottom_up(x)["res5"])
    assert neck.top_block.in_feature == "res5" and neck.top_block.p6.in_channels == 40
    assert torch.equal(out["p6"], p6)
    assert torch.equal(out["p7"], neck.top_block.p7(F.relu(p6)))


def test_weighted_fusion_weights_stay_non_negative_after_optimizer_steps():
    torch.manual_seed(0)
    model = build_backbone(toy_cfg(FUSE_TYPE="weighted", BOTTOM_UP_PATH=True))
    fusions = [model.top_down_fusion, model.pan_fusion]
    before = [f.weight.detach().clone() for f in fusions]
    opt = torch.optim.SGD([f.weight for f in fusions], lr=1000.0)
    x = torch.randn(1, 3, 64, 64)
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        # Pushes weights in both directions, hard: some raw values go below zero.
        loss = sum((t * torch.randn_like(t)).mean() for t in out.values())
        loss.backward()
        opt.step()
    raw = torch.cat([f.weight.detach().flatten() for f in fusions])
    assert not all(torch.equal(a, f.weight) for a, f in zip(before, fusions))
    assert (raw < 0).any(), "the test must drive some raw weight negative"
    for f in fusions:
        for node in range(f.weight.shape[0]):
            w = f.normalized_weights(node)
            assert (w >= 0).all() and w.sum() <= 1.0
    assert all(torch.isfinite(t).all() for t in model(x).values())


def test_weighted_fusion_module_normalizes_and_clamps():
    fusion = WeightedFusion(num_nodes=2, num_inputs=3, eps=1e-4)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([[1.0, 2.0, 1.0], [3.0, -2.0, 1.0]]))
    xs = [torch.full((1, 2, 3, 3), v) for v in (1.0, 10.0, 100.0)]
    assert torch.allclose(fusion(xs, 0), torch.full((1, 2, 3, 3), 121.0 / 4.0001))
    # Node 1: the negative raw weight is treated as 0.
    assert torch.allclose(fusion(xs, 1), torch.full((1, 2, 3, 3), 103.0 / 4.0001))
    assert torch.allclose(fusion.normalized_weights(1), torch.tensor([3.0, 0.0, 1.0]) / 4.0001)
    with pytest.raises(ValueError):
        fusion(xs[:2], 0)


def test_generic_builder_puts_the_neck_on_any_registered_backbone():
    model = build_backbone(toy_cfg(IN_FEATURES=["res3", "res4", "res5"]))
    assert isinstance(model, CustomFPN) and isinstance(model.bottom_up, ToyBackbone)
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        "p3": (32, 8), "p4": (32, 16), "p5": (32, 32), "p6": (32, 64)
    }
    out = model(torch.randn(1, 3, 96, 64))
    assert out["p3"].shape == (1, 32, 12, 8) and out["p6"].shape == (1, 32, 2, 1)


def test_unpadded_odd_inputs_still_line_up():
    """Upsampling to the lateral's size: a caller that skips padding still gets a pyramid."""
    model = build_backbone(toy_cfg(BOTTOM_UP_PATH=True, UPSAMPLE_MODE="bilinear")).eval()
    out = model(torch.randn(1, 3, 67, 45))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(17, 12), (9, 6), (5, 3), (3, 2), (2, 1)]


def test_single_input_feature_is_a_plain_conv_stack():
    model = build_backbone(toy_cfg(IN_FEATURES=["res4"], FUSE_TYPE="weighted", BOTTOM_UP_PATH=True))
    assert model.top_down_fusion is None and model.pan_fusion is None
    assert list(model(torch.randn(1, 3, 32, 32))) == ["p4", "p5"]


def test_named_top_block_reads_its_own_level_even_if_the_backbone_has_that_name():
    """A bottom-up backbone with "p*" outputs (e.g. another FPN) does not shadow P5."""
    bottom_up = ToyBackbone(names=("p2", "p3", "p4", "p5"))  # its "p5" has 40 channels
    neck = CustomFPN(bottom_up, ["p2", "p3", "p4", "p5"], 32, top_block="maxpool").eval()
    out = neck(torch.randn(1, 3, 64, 64))
    assert torch.equal(out["p6"], F.max_pool2d(out["p5"], kernel_size=1, stride=2))
