"""The shipped PANet mask-head config merges onto the base config and builds its ROI heads."""
import os

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.mask_head import PANetMaskHead

CONFIG = os.path.join(
    os.path.dirname(__file__),
    "..",
    "..",
    "configs",
    "COCO-InstanceSegmentation",
    "mask_rcnn_R_50_custom_fpn_panet_mask_1x.yaml",
)


def test_panet_config_builds_roi_heads_with_adaptive_pooling():
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.merge_from_file(CONFIG)
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "PANetMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32  # small: the test checks wiring, not capacity
    shapes = {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(2, 7)}
    roi_heads = build_roi_heads(cfg, shapes)
    assert roi_heads.mask_pooler is None
    head = roi_heads.mask_head
    assert isinstance(head, PANetMaskHead)
    assert head.in_features == ["p2", "p3", "p4", "p5"]
    assert head.pooler.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert head.fused_fc and head.fuse_type == "max" and head.pooler.aligned
    assert head.pooler.output_size == 14
