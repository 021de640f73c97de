"""The neck variant configs merge, build the plugin backbone they describe, and their RPN/ROI
feature names exist in its pyramid. (tests/test_configs.py trains every config one step.)"""
import os

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.neck import BiFPN, CustomFPN, WeightedFusion

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "COCO-InstanceSegmentation",
)
LEVELS = ["p2", "p3", "p4", "p5", "p6"]


def _check_panet(model):
    assert model.pan_fusion is not None and len(model.pan_output_convs) == 3


def _check_weighted(model):
    assert isinstance(model.top_down_fusion, WeightedFusion)
    assert getattr(model, "pan_fusion", None) is None


def _check_bilinear(model):
    assert model._upsample_mode == "bilinear"


def _check_gn(model):
    assert type(model.fpn_lateral2.norm).__name__ == "GroupNorm" and model.fpn_output5.bias is None


def _check_p3p7(model):
    assert model.top_block.in_feature == "p5" and model.top_block.p6.in_channels == 256


def _check_bifpn(model):
    assert isinstance(model, BiFPN) and len(model.cells) == 3
    assert all(isinstance(cell.mid_fusion, WeightedFusion) for cell in model.cells)
    assert type(model.cells[0].top_conv.pointwise.norm).__name__ == "GroupNorm"
    assert not any(name.startswith("fpn_output") for name, _ in model.named_children())


VARIANTS = {
    "mask_rcnn_R_50_custom_fpn_bifpn_1x.yaml": (LEVELS, _check_bifpn),
    "mask_rcnn_R_50_custom_fpn_panet_1x.yaml": (LEVELS, _check_panet),
    "mask_rcnn_R_50_custom_fpn_weighted_fusion_1x.yaml": (LEVELS, _check_weighted),
    "mask_rcnn_R_50_custom_fpn_bilinear_1x.yaml": (LEVELS, _check_bilinear),
    "mask_rcnn_R_50_custom_fpn_neck_gn_1x.yaml": (LEVELS, _check_gn),
    "mask_rcnn_R_50_custom_fpn_p3p7_1x.yaml": (["p3", "p4", "p5", "p6", "p7"], _check_p3p7),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_config_builds_its_neck(name):
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    model = build_backbone(cfg)
    levels, check = VARIANTS[name]
    assert isinstance(model, CustomFPN)
    assert list(model.output_shape()) == levels
    assert set(cfg.MODEL.RPN.IN_FEATURES) <= set(levels)
    assert set(cfg.MODEL.ROI_HEADS.IN_FEATURES) <= set(levels)
    assert len(cfg.MODEL.ANCHOR_GENERATOR.SIZES) == len(cfg.MODEL.RPN.IN_FEATURES)
    check(model)
