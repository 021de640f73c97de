"""
Both mask heads script (Detectron2's ``scripting_with_instances`` way, as for its own
MaskRCNNConvUpsampleHead) and trace (whole inference forward, boxes and classes as inputs),
giving the eager ``pred_masks``; traces also for other numbers of detections.
"""
from typing import List

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Boxes, Instances
from jit_testutils import scripted_with_instances, torchscript_patch, trace
from mask_head_testutils import BOXES, inference_instances, mask_cfg, randomize_
from torch import Tensor, nn

POOLED = ShapeSpec(channels=8, height=7, width=7)
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
LEVELS = {f: ShapeSpec(channels=8, stride=s) for f, s in STRIDES.items()}
IMAGE = (64, 64)
FIELDS = {"pred_boxes": Boxes, "pred_classes": Tensor, "scores": Tensor, "pred_masks": Tensor}

CASES = {
    "conv_upsample": ("ConvUpsampleMaskHead", POOLED, {}),
    "conv_upsample-bilinear-GN-agnostic": (
        "ConvUpsampleMaskHead", POOLED,
        {"UPSAMPLE_MODE": "bilinear", "NORM": "GN", "conv_dim": 32, "CLS_AGNOSTIC_MASK": True},
    ),
    "panet-adaptive-fc": ("PANetMaskHead", LEVELS, {"POOLER_TYPE": "", "num_conv": 4}),
    "panet-adaptive-mean-nearest": (
        "PANetMaskHead", LEVELS,
        {"POOLER_TYPE": "", "PANET_FUSE_TYPE": "mean", "PANET_FUSED_FC": False,
         "UPSAMPLE_MODE": "nearest", "PANET_POOLER_TYPE": "ROIAlign"},
    ),
    "panet-pooled": ("PANetMaskHead", POOLED, {"PANET_ADAPTIVE_POOLING": False}),
}


def _head(name, shape, keys):
    keys = dict(keys, POOLER_RESOLUTION=7)
    kw = {k: keys.pop(k) for k in ("num_conv", "conv_dim") if k in keys}
    return randomize_(build_mask_head(mask_cfg(name, **kw, **keys), shape)).eval()


def _inputs(shape, instances, seed=0):
    """What StandardROIHeads hands the head: pooled ROI features or the feature maps."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(shape, dict):
        return {f: torch.randn(2, 8, 64 // s, 64 // s, generator=gen) for f, s in STRIDES.items()}
    n = sum(len(i) for i in instances)
    return torch.randn(n, shape.channels, shape.height, shape.width, generator=gen)


@pytest.mark.parametrize("name, shape, keys", CASES.values(), ids=list(CASES))
def test_scripted_head_equals_eager(name, shape, keys):
    head = _head(name, shape, keys)
    eager = inference_instances(BOXES, num_classes=3)
    x = _inputs(shape, eager)
    with torch.no_grad():
        head(x, eager)
    with scripted_with_instances(head, FIELDS) as (scripted, to_scripted):
        got = scripted(x, [to_scripted(i) for i in inference_instances(BOXES, num_classes=3)])
    for g, e in zip(got, eager):
        assert e.pred_masks.shape == (len(e), 1, 14, 14)
        assert torch.equal(g.pred_masks, e.pred_masks)


class _PredMasks(nn.Module):
    """The head's inference forward with tensors in and out (what tracing needs)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, boxes: List[Tensor], classes: List[Tensor]) -> List[Tensor]:
        instances = []
        for b, c in zip(boxes, classes):
            inst = Instances(IMAGE)
            inst.pred_boxes = Boxes(b)
            inst.pred_classes = c
            instances.append(inst)
        return [i.pred_masks for i in self.head(x, instances)]


@pytest.mark.parametrize("name, shape, keys", CASES.values(), ids=list(CASES))
def test_traced_head_equals_eager_for_other_detections(name, shape, keys):
    wrapper = _PredMasks(_head(name, shape, keys))

    def inputs(boxes_per_image, seed):
        instances = inference_instances(boxes_per_image, num_classes=3, seed=seed)
        boxes = [i.pred_boxes.tensor for i in instances]
        return _inputs(shape, instances, seed), boxes, [i.pred_classes for i in instances]

    # Detectron2 traces its mask inference with len() patched to stay a traced value.
    with torch.no_grad(), torchscript_patch().patch_builtin_len():
        traced = trace(wrapper, inputs(BOXES, 0))
        other = [[[1.0, 2.0, 20.0, 30.0]], BOXES[0] + BOXES[1]]
        for args in (inputs(BOXES, 1), inputs(other, 2)):
            got, want = traced(*args), wrapper(*args)
            assert [len(m) for m in want] == [len(b) for b in args[1]]
            for g, w in zip(got, want):
                assert torch.equal(g, w)
