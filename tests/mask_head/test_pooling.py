"""Multi-level ROI pooling and level fusion (pure tensor logic)."""
import pytest
import torch
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

from fpn_plugin.layers import fuse_levels
from fpn_plugin.mask_head.pooling import roi_align_all_levels

STRIDES = [4, 8, 16, 32]


def _pyramid(seed=0, channels=4, size=64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, size // s, size // s, generator=gen) for s in STRIDES]


def _boxes():
    return [
        Boxes(torch.tensor([[4.0, 4.0, 20.0, 30.0], [0.0, 0.0, 63.0, 63.0]])),
        Boxes(torch.tensor([[10.0, 12.0, 14.0, 16.0]])),
    ]


@pytest.mark.parametrize("pooler_type,aligned", [("ROIAlignV2", True), ("ROIAlign", False)])
def test_each_level_equals_detectron2_single_level_pooler(pooler_type, aligned):
    features = _pyramid()
    rois = convert_boxes_to_pooler_format(_boxes())
    pooled = roi_align_all_levels(features, rois, 7, [1.0 / s for s in STRIDES], 2, aligned)
    assert len(pooled) == 4
    for level, stride in enumerate(STRIDES):
        # A one-level ROIPooler sends every box to that level: Detectron2's reference.
        reference = ROIPooler(7, (1.0 / stride,), 2, pooler_type)([features[level]], _boxes())
        assert pooled[level].shape == (3, 4, 7, 7)
        assert torch.equal(pooled[level], reference)


def test_mismatched_levels_and_scales_raise():
    with pytest.raises(ValueError, match="2 feature levels but 1 scales"):
        roi_align_all_levels(_pyramid()[:2], torch.zeros(1, 5), 7, [0.25], 0, True)


def test_fuse_levels_max_sum_mean():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 2, 5, 5, generator=gen) for _ in range(3)]
    stacked = torch.stack(xs)
    assert torch.equal(fuse_levels(xs, "max"), stacked.max(0).values)
    assert torch.allclose(fuse_levels(xs, "sum"), stacked.sum(0))
    assert torch.allclose(fuse_levels(xs, "mean"), stacked.mean(0))
    assert torch.equal(fuse_levels(xs[:1], "max"), xs[0])
    # One vocabulary for the whole plugin: "avg" (the neck's word) is "mean".
    assert torch.equal(fuse_levels(xs, "avg"), fuse_levels(xs, "mean"))
    with pytest.raises(ValueError, match="got 'min'"):
        fuse_levels(xs, "min")
    with pytest.raises(ValueError, match="at least one level"):
        fuse_levels([], "max")


def test_pure_functions_script_and_match_eager():
    features = _pyramid(seed=3)
    rois = convert_boxes_to_pooler_format(_boxes())
    scales = [1.0 / s for s in STRIDES]
    scripted_pool = torch.jit.script(roi_align_all_levels)
    scripted_fuse = torch.jit.script(fuse_levels)
    eager = fuse_levels(roi_align_all_levels(features, rois, 5, scales, 0, True), "mean")
    scripted = scripted_fuse(scripted_pool(features, rois, 5, scales, 0, True), "mean")
    assert torch.equal(eager, scripted)
