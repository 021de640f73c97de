"""Mask-head config keys: defaults match Detectron2; bad values fail at build, naming the key."""
import pytest
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from mask_head_testutils import mask_cfg

from fpn_plugin.mask_head import add_mask_head_config

POOLED = ShapeSpec(channels=8, height=7, width=7)
LEVELS = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}


def test_defaults_and_idempotent_adder():
    cfg = get_cfg()
    add_mask_head_config(cfg)
    head = cfg.MODEL.ROI_MASK_HEAD
    assert head.UPSAMPLE_MODE == "deconv"
    assert (head.PANET.ADAPTIVE_POOLING, head.PANET.FUSED_FC) == (True, True)
    assert (head.PANET.FUSE_TYPE, head.PANET.POOLER_TYPE) == ("max", "ROIAlignV2")
    head.PANET.FUSE_TYPE = "sum"
    add_mask_head_config(cfg)  # a second call keeps values already set
    assert head.PANET.FUSE_TYPE == "sum"
    # Detectron2's own keys untouched
    assert (head.NUM_CONV, head.CONV_DIM, head.POOLER_TYPE) == (0, 256, "ROIAlignV2")


def test_yaml_style_overrides_merge():
    cfg = mask_cfg("PANetMaskHead")
    cfg.merge_from_list(
        [
            "MODEL.ROI_MASK_HEAD.UPSAMPLE_MODE",
            "bilinear",
            "MODEL.ROI_MASK_HEAD.PANET.FUSED_FC",
            False,
        ]
    )
    assert cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_MODE == "bilinear"
    assert cfg.MODEL.ROI_MASK_HEAD.PANET.FUSED_FC is False


BAD = [
    # (head name, input shape, overrides, key named in the error, offending value in the error)
    ("ConvUpsampleMaskHead", POOLED, {"UPSAMPLE_MODE": "bicubic"}, "UPSAMPLE_MODE", "bicubic"),
    ("ConvUpsampleMaskHead", POOLED, {"NORM": "XN"}, "MODEL.ROI_MASK_HEAD.NORM", "XN"),
    ("ConvUpsampleMaskHead", POOLED, {"NORM": "GN"}, "MODEL.ROI_MASK_HEAD.CONV_DIM", "16"),
    ("ConvUpsampleMaskHead", POOLED, {"num_conv": -1}, "MODEL.ROI_MASK_HEAD.NUM_CONV", "-1"),
    ("ConvUpsampleMaskHead", POOLED, {"conv_dim": 0}, "MODEL.ROI_MASK_HEAD.CONV_DIM", "0"),
    ("ConvUpsampleMaskHead", POOLED, {"num_classes": 0}, "MODEL.ROI_HEADS.NUM_CLASSES", "0"),
    ("ConvUpsampleMaskHead", LEVELS, {"POOLER_TYPE": ""}, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "''"),
    ("PANetMaskHead", POOLED, {}, "MODEL.ROI_MASK_HEAD.PANET.ADAPTIVE_POOLING", "ROIAlignV2"),
    (
        "PANetMaskHead",
        LEVELS,
        {"POOLER_TYPE": "", "PANET_ADAPTIVE_POOLING": False},
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "''",
    ),
    ("PANetMaskHead", LEVELS, {"PANET_FUSE_TYPE": "min"}, "PANET.FUSE_TYPE", "min"),
    ("PANetMaskHead", LEVELS, {"PANET_POOLER_TYPE": "ROIPool"}, "PANET.POOLER_TYPE", "ROIPool"),
    ("PANetMaskHead", LEVELS, {"num_conv": 0}, "MODEL.ROI_MASK_HEAD.NUM_CONV", "0"),
    ("PANetMaskHead", LEVELS, {"conv_dim": 1}, "MODEL.ROI_MASK_HEAD.CONV_DIM", "1"),
    (
        "PANetMaskHead",
        {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=16, stride=8)},
        {"POOLER_TYPE": ""},
        "MODEL.ROI_HEADS.IN_FEATURES",
        "16",
    ),
]


@pytest.mark.parametrize("name,shape,overrides,key,value", BAD)
def test_bad_config_fails_at_build_naming_key_and_value(name, shape, overrides, key, value):
    overrides = dict(overrides)
    kw = {k: overrides.pop(k) for k in ("num_conv", "conv_dim", "num_classes") if k in overrides}
    cfg = mask_cfg(name, **kw, **overrides)
    with pytest.raises(ValueError) as err:
        build_mask_head(cfg, shape)
    assert key in str(err.value) and value in str(err.value)
