"""
Parity with Detectron2's built-in FPN: same parameter names, same fresh initialisation, strict
loading of Detectron2's weights, bit-identical pyramids and bit-identical gradients of the
input and of every parameter (R50, padded odd and even sizes; norms in training mode).
"""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import (
    FPN,
    LastLevelMaxPool,
    LastLevelP6P7,
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from neck_testutils import padded, r50_cfg, randomize_, tiny_cfg

from fpn_plugin.neck import CustomFPN

# Batches of padded images (odd, non-square sizes), as GeneralizedRCNN forms them.
BATCHES = {
    "mask_rcnn_fpn": [[(67, 101)], [(64, 96), (33, 45)]],  # padded to 96x128, 64x96
    "retinanet_fpn": [[(45, 77), (70, 50)]],  # padded to 96x96
}
INPUT = ShapeSpec(channels=3)


def _assert_same_pyramid(ref, ours, images):
    x = padded(images, ref.size_divisibility)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())


def _assert_same_gradients(ref, ours, images):
    """Backpropagate the same random weighting of every level through both: the gradients of
    the input and of every trainable parameter are bit-identical."""
    x = padded(images, ref.size_divisibility)
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        g = torch.Generator().manual_seed(5)
        loss = sum((out[k] * torch.randn(out[k].shape, generator=g)).sum() for k in sorted(out))
        loss.backward()
        params = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads.append((leaf.grad, params))
    (x_ref, p_ref), (x_ours, p_ours) = grads
    assert torch.equal(x_ours, x_ref)
    assert p_ours.keys() == p_ref.keys()
    assert any(n.startswith("fpn_") for n in p_ref)
    for name, grad in p_ref.items():
        assert grad is not None and p_ours[name] is not None, name
        assert torch.equal(p_ours[name], grad), (name, (p_ours[name] - grad).abs().max().item())


def _assert_same_contract(ref, ours):
    assert ours.output_shape() == ref.output_shape()
    assert ours.size_divisibility == ref.size_divisibility
    assert ours._out_features == ref._out_features
    assert ours.padding_constraints == {"square_size": 0}  # Detectron2 main's FPN value


def _plugin(cfg, seed):
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_custom_fpn_backbone"
    torch.manual_seed(seed)
    return build_backbone(cfg).eval()


@pytest.mark.parametrize(
    "builder, top_block, in_features",
    [
        (build_resnet_fpn_backbone, "maxpool", ["res2", "res3", "res4", "res5"]),
        (build_retinanet_resnet_fpn_backbone, "p6p7_res5", ["res3", "res4", "res5"]),
    ],
    ids=["mask_rcnn_fpn", "retinanet_fpn"],
)
def test_r50_checkpoint_loads_strictly_and_gives_identical_pyramids_and_gradients(
    request, builder, top_block, in_features
):
    cfg = r50_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = list(in_features)
    cfg.MODEL.FPN.IN_FEATURES = list(in_features)
    cfg.MODEL.FPN.TOP_BLOCK = top_block

    torch.manual_seed(0)
    ref = builder(cfg, INPUT).eval()
    # Fresh builds with one seed are equal tensor for tensor, keys in the same order.
    ours = _plugin(cfg, seed=0)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)

    # A "trained" Detectron2 checkpoint: random neck and norm statistics (bottom-up: seed 1).
    randomize_(ref, seed=1)
    ours = _plugin(cfg, seed=2)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_contract(ref, ours)
    for sizes in BATCHES[request.node.callspec.id]:
        images = [torch.randn(3, *hw) for hw in sizes]
        _assert_same_pyramid(ref, ours, images)
        _assert_same_gradients(ref, ours, images)


@pytest.mark.parametrize(
    "fpn_keys",
    [
        {"FUSE_TYPE": "avg"},
        {"NORM": "GN"},
        {"NORM": "BN"},
        {"NORM": "FrozenBN"},
        {"TOP_BLOCK": "none"},
        {"TOP_BLOCK": "p6p7_p5"},
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_options_detectron2_also_has_match_its_fpn(fpn_keys):
    """Settings Detectron2's FPN class supports (norm, avg fusion, top blocks) stay identical,
    forward and backward."""
    cfg = tiny_cfg(**fpn_keys)
    top_block = cfg.MODEL.FPN.TOP_BLOCK
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    torch.manual_seed(0)
    bottom_up = build_resnet_backbone(cfg, INPUT)
    ref = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block={
            "none": None,
            "maxpool": LastLevelMaxPool(),
            "p6p7_p5": LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        }[top_block],
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    randomize_(ref, seed=3)
    ref.train()  # BN uses batch statistics: the comparison covers training-mode norms too
    ours = build_backbone(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.train()
    _assert_same_contract(ref, ours)
    images = [torch.randn(3, 50, 70), torch.randn(3, 37, 33)]
    _assert_same_pyramid(ref, ours, images)
    _assert_same_gradients(ref, ours, images)
    # BN's running statistics moved alike (each side ran two training-mode forwards).
    for name, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


def test_python_constructor_matches_detectron2_fpn_signature():
    """CustomFPN takes Detectron2 FPN's constructor arguments, including a top-block module."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ref = build_resnet_fpn_backbone(cfg, INPUT).eval()
    ours = CustomFPN(
        bottom_up=build_resnet_backbone(cfg, INPUT),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm="",
        top_block=ref.top_block,
        fuse_type="sum",
    ).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_pyramid(ref, ours, [torch.randn(3, 41, 59)])
