"""PANetMaskHead: each switch does what it claims, and with both off it is the parity head."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.utils.events import EventStorage
from mask_head_testutils import (
    BOXES,
    HeadLayers,
    inference_instances,
    mask_cfg,
    randomize_,
    tiny_batch,
    tiny_mask_rcnn_cfg,
    training_instances,
)

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
LEVELS = {f: ShapeSpec(channels=8, stride=s) for f, s in STRIDES.items()}
POOLED = ShapeSpec(channels=8, height=7, width=7)


def _pyramid(seed=0, size=64):
    gen = torch.Generator().manual_seed(seed)
    return {f: torch.randn(2, 8, size // s, size // s, generator=gen) for f, s in STRIDES.items()}


def _panet(input_shape, **kw):
    kw.setdefault("num_conv", 4)
    kw.setdefault("POOLER_RESOLUTION", 7)
    return randomize_(build_mask_head(mask_cfg("PANetMaskHead", **kw), input_shape))


def _parity_weights_into_panet(parity, panet):
    """Map ConvUpsampleMaskHead's parameters onto PANetMaskHead's layout (switches off)."""
    src = parity.state_dict()
    dst = {}
    for k, v in src.items():
        layer, rest = k.split(".", 1)
        if layer == "mask_fcn1":
            dst[f"fcn1_per_level.0.{rest}"] = v
        elif layer.startswith("mask_fcn"):
            part = "fcn_trunk" if f"{layer}.{rest}" in panet.fcn_trunk.state_dict() else "fcn_tail"
            dst[f"{part}.{k}"] = v
        elif layer == "deconv":
            dst[f"upsample.{k}"] = v
        else:
            dst[k] = v
    panet.load_state_dict(dst, strict=True)


def test_both_switches_off_equals_parity_head():
    panet = _panet(
        POOLED, PANET_ADAPTIVE_POOLING=False, PANET_FUSED_FC=False, POOLER_TYPE="ROIAlignV2"
    )
    parity = randomize_(
        build_mask_head(mask_cfg("ConvUpsampleMaskHead", num_conv=4, POOLER_RESOLUTION=7), POOLED)
    )
    _parity_weights_into_panet(parity, panet)
    x = torch.randn(5, 8, 7, 7)
    assert torch.equal(panet.layers([x]), parity.layers(x))
    instances = training_instances(BOXES, num_classes=3)
    with EventStorage():
        assert torch.equal(panet(x, instances)["loss_mask"], parity(x, instances)["loss_mask"])


def test_adaptive_pooling_on_one_level_equals_roipooler_plus_parity_head():
    # One input level: adaptive pooling + "fusion" of one level must reduce to ROIAlignV2 on
    # that level followed by the plain FCN head.
    panet = _panet(
        {"p3": LEVELS["p3"]}, PANET_FUSED_FC=False, POOLER_TYPE="", POOLER_SAMPLING_RATIO=2
    )
    parity = build_mask_head(mask_cfg("ConvUpsampleMaskHead", num_conv=4), POOLED)
    _parity_weights_into_panet(randomize_(parity), panet)
    features = _pyramid()
    instances = inference_instances(BOXES, num_classes=3)
    pooler = ROIPooler(7, (1.0 / 8,), 2, "ROIAlignV2")
    pooled = pooler([features["p3"]], [i.pred_boxes for i in instances])
    panet.eval()
    expected = parity.layers(pooled)
    got = panet.layers(panet.pool({"p3": features["p3"]}, instances))
    assert torch.equal(got, expected)


def test_adaptive_pooling_uses_every_level_for_every_roi():
    panet = _panet(LEVELS, PANET_FUSED_FC=False, POOLER_TYPE="").eval()
    assert len(panet.fcn1_per_level) == 4
    features = {f: x.requires_grad_(True) for f, x in _pyramid().items()}
    instances = inference_instances(BOXES, num_classes=3)
    boxes = [i.pred_boxes for i in instances]
    num_rois = sum(len(b) for b in boxes)
    pooled = panet.pool(features, instances)
    # Every ROI is pooled from every level: level l's rows are ROIAlignV2 of each ROI on l
    # (Detectron2's level mapping would send each ROI to one level only).
    assert len(pooled) == len(STRIDES)
    for level, (f, stride) in enumerate(STRIDES.items()):
        reference = ROIPooler(7, (1.0 / stride,), 0, "ROIAlignV2")([features[f]], boxes)
        assert pooled[level].shape == (num_rois, 8, 7, 7)
        assert torch.equal(pooled[level], reference), f
    # ... and every ROI's logits depend on every level (through its own region only): the
    # gradient of ROI r's logits reaches each level's map inside r's box, at r's image.
    logits = panet.layers(pooled)
    flat = [(image, box) for image, b in enumerate(boxes) for box in b.tensor.tolist()]
    assert len(flat) == num_rois
    for roi, (image, (x0, y0, x1, y1)) in enumerate(flat):
        grads = torch.autograd.grad(logits[roi].sum(), list(features.values()), retain_graph=True)
        for (f, stride), grad in zip(STRIDES.items(), grads):
            assert grad[image].abs().sum() > 0, (roi, f)
            assert grad[1 - image].abs().sum() == 0, (roi, f)  # the other image's map: untouched
            # Nothing outside the box (with ROIAlign's one-cell bilinear margin) contributes.
            inside = torch.zeros_like(grad[image][0], dtype=torch.bool)
            inside[max(int(y0 / stride) - 1, 0):int(y1 / stride) + 2,
                   max(int(x0 / stride) - 1, 0):int(x1 / stride) + 2] = True
            assert grad[image][:, ~inside].abs().sum() == 0, (roi, f)


@pytest.mark.parametrize("fuse", ["max", "sum", "mean"])
def test_fused_fc_adds_one_class_agnostic_map(fuse):
    panet = _panet(LEVELS, POOLER_TYPE="", PANET_FUSE_TYPE=fuse).eval()
    features = _pyramid()
    pooled = panet.pool(features, inference_instances(BOXES, num_classes=3))
    with_fc = panet.layers(pooled)
    panet.fused_fc = False
    without_fc = panet.layers(pooled)
    delta = with_fc - without_fc
    assert with_fc.shape == (5, 3, 14, 14)
    assert delta.abs().max() > 1e-3
    assert torch.allclose(delta, delta[:, :1].expand_as(delta))


def test_fc_branch_taps_the_second_to_last_conv():
    panet = _panet(POOLED, PANET_ADAPTIVE_POOLING=False, POOLER_TYPE="ROIAlignV2")
    assert [n for n, _ in panet.fcn_trunk.named_children()] == ["mask_fcn2", "mask_fcn3"]
    assert [n for n, _ in panet.fcn_tail.named_children()] == ["mask_fcn4"]
    assert panet.fc.in_features == 8 * 7 * 7 and panet.fc.out_features == 14 * 14


@pytest.mark.parametrize("cls_agnostic", [False, True])
def test_trains_and_predicts_inside_mask_rcnn(cls_agnostic):
    cfg = tiny_mask_rcnn_cfg("PANetMaskHead", POOLER_TYPE="", CLS_AGNOSTIC_MASK=cls_agnostic)
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert model.roi_heads.mask_pooler is None and head.in_features == ["p2", "p3", "p4", "p5"]
    model.train()
    with EventStorage():
        losses = model(tiny_batch())
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for conv in head.fcn1_per_level:
        assert conv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model([{"image": d["image"]} for d in tiny_batch()])
    for o in out:
        inst = o["instances"]
        assert len(inst) > 0 and inst.pred_masks.shape == (len(inst), 64, 64)


def test_no_detections_gives_empty_masks():
    panet = _panet(LEVELS, POOLER_TYPE="").eval()
    instances = inference_instances([[], [[1.0, 2.0, 30.0, 30.0]]], num_classes=3)
    panet(_pyramid(), instances)
    assert instances[0].pred_masks.shape == (0, 1, 14, 14)
    assert instances[1].pred_masks.shape == (1, 1, 14, 14)


def test_layers_trace_matches_eager():
    panet = _panet(LEVELS, POOLER_TYPE="").eval()
    pooled = panet.pool(_pyramid(), inference_instances(BOXES, num_classes=3))

    traced = torch.jit.trace(HeadLayers(panet), (pooled,))
    other = panet.pool(_pyramid(seed=4), inference_instances(BOXES, num_classes=3))
    assert torch.equal(traced(other), panet.layers(other))
