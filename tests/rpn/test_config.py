"""The RPN's config keys, and the configs/ files that use the per-level RPN."""
import os

import pytest
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator

from fpn_plugin import add_fpn_plugin_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
FPN_SHAPES = {f"p{i}": ShapeSpec(channels=256, stride=2 ** i) for i in range(2, 7)}


def _cfg():
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    return cfg


def test_defaults_keep_detectron2_behaviour():
    rpn = _cfg().MODEL.RPN
    assert rpn.SHARED_HEAD is True and rpn.HEAD_NORM == "" and rpn.POST_NMS_TOPK_MODE == "per_image"
    for s in ("PRE", "POST"):
        for phase in ("TRAIN", "TEST"):
            assert rpn.get(f"{s}_NMS_TOPK_{phase}_PER_LEVEL") == []
    assert "SHARED_HEAD" not in get_cfg().MODEL.RPN  # Detectron2's global defaults untouched


def test_yaml_lists_merge_into_per_level_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "MODEL:\n  RPN:\n    PRE_NMS_TOPK_TEST_PER_LEVEL: [10, 20, 30, 40, 50]\n"
        "    POST_NMS_TOPK_MODE: per_level\n    POST_NMS_TOPK_TEST: 77\n"
    )
    cfg = _cfg()
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TEST_PER_LEVEL == [10, 20, 30, 40, 50]
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PerLevelRPN"
    cfg.MODEL.RPN.IN_FEATURES = list(FPN_SHAPES)
    rpn = build_proposal_generator(cfg, FPN_SHAPES)
    assert rpn.pre_nms_topk[False] == [10, 20, 30, 40, 50]
    assert rpn.post_nms_topk_per_level[False] == [77] * 5  # an int key on every level


def _load(name):
    cfg = _cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    return cfg


def test_base_config_builds_a_detectron2_equivalent_rpn():
    cfg = _load("Base-RCNN-CustomFPN.yaml")
    rpn = build_proposal_generator(cfg, FPN_SHAPES)
    assert type(rpn).__name__ == "PerLevelRPN"
    assert rpn.pre_nms_topk == {True: [2000] * 5, False: [1000] * 5}
    assert rpn.post_nms_topk == {True: 1000, False: 1000} and rpn.post_nms_topk_per_level is None
    head = rpn.rpn_head
    assert [k for k, _ in head.state_dict().items()] == [
        "conv.weight", "conv.bias", "objectness_logits.weight", "objectness_logits.bias",
        "anchor_deltas.weight", "anchor_deltas.bias",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "mask_rcnn_R_50_custom_fpn_unshared_rpn_1x.yaml",
        "mask_rcnn_R_50_custom_fpn_per_level_anchors_1x.yaml",
        "mask_rcnn_R_50_custom_fpn_gn_rpn_per_level_topk_1x.yaml",
    ],
)
def test_variant_configs_build(name):
    cfg = _load(os.path.join("COCO-InstanceSegmentation", name))
    assert cfg.MODEL.MASK_ON and cfg.MODEL.RESNETS.DEPTH == 50
    rpn = build_proposal_generator(cfg, FPN_SHAPES)
    head = rpn.rpn_head
    if "unshared" in name:
        assert getattr(head, "conv", None) is None
        assert len(head.level_convs) == 5 and len(head.predictors) == 5
    elif "per_level_anchors" in name:
        assert rpn.anchor_generator.num_anchors == [3, 3, 3, 3, 5]
        assert head.conv is not None and head.predictor_levels == [[0, 1, 2, 3], [4]]
    else:
        assert len(head.conv) == 2 and head.conv.conv1.norm.__class__.__name__ == "GroupNorm"
        assert rpn.post_nms_topk_per_level
        assert rpn.pre_nms_topk[False] == [2000, 1000, 1000, 500, 500]
        assert sum(rpn.post_nms_topk_per_level[False]) == cfg.MODEL.RPN.POST_NMS_TOPK_TEST
