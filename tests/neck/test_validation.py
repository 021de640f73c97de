"""Bad neck configs fail when the backbone is built, with a ValueError naming key and value."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from neck_testutils import ToyBackbone, tiny_cfg, toy_cfg

from fpn_plugin.neck import CustomFPN


def _raises(cfg, *fragments):
    with pytest.raises(ValueError) as info:
        build_backbone(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    "key, value, fragments",
    [
        ("FUSE_TYPE", "max", ["MODEL.FPN.FUSE_TYPE", "'max'"]),
        ("UPSAMPLE_MODE", "bicubic", ["MODEL.FPN.UPSAMPLE_MODE", "'bicubic'"]),
        ("TOP_BLOCK", "p6", ["MODEL.FPN.TOP_BLOCK", "'p6'"]),
        ("NORM", "LayerNorm2", ["MODEL.FPN.NORM", "'LayerNorm2'"]),
        ("OUT_CHANNELS", 0, ["MODEL.FPN.OUT_CHANNELS", "0"]),
        ("BOTTOM_UP_PATH", "yes", ["MODEL.FPN.BOTTOM_UP_PATH", "'yes'"]),
        ("WEIGHTED_FUSION_EPS", 0.0, ["MODEL.FPN.WEIGHTED_FUSION_EPS", "0.0"]),
        ("IN_FEATURES", [], ["MODEL.FPN.IN_FEATURES", "[]"]),
    ],
)
def test_unknown_option_values(key, value, fragments):
    _raises(toy_cfg(**{key: value}), *fragments)


def test_feature_the_backbone_does_not_produce():
    _raises(toy_cfg(IN_FEATURES=["res3", "res4", "res6"]), "MODEL.FPN.IN_FEATURES", "'res6'")
    # ResNet computes only MODEL.RESNETS.OUT_FEATURES; the message points there too.
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    _raises(cfg, "MODEL.FPN.IN_FEATURES", "'res2'", "MODEL.RESNETS.OUT_FEATURES")


@pytest.mark.parametrize(
    "in_features, strides",
    [
        (["res2", "res4"], "[4, 16]"),  # powers of two, but a level apart
        (["res5", "res4", "res3"], "[32, 16, 8]"),  # low to high resolution
        (["res3", "res3"], "[8, 8]"),
    ],
)
def test_strides_not_doubling(in_features, strides):
    _raises(toy_cfg(IN_FEATURES=in_features), "MODEL.FPN.IN_FEATURES", strides)


def test_strides_not_powers_of_two():
    cfg = toy_cfg(BOTTOM_UP_BACKBONE="neck_test_stride12_backbone")
    _raises(cfg, "MODEL.FPN.IN_FEATURES", "'res3'", "stride 12")


def test_channel_counts():
    # GroupNorm(32, C) needs C divisible by 32.
    _raises(toy_cfg(NORM="GN", OUT_CHANNELS=48), "MODEL.FPN.NORM", "'GN'",
            "MODEL.FPN.OUT_CHANNELS=48")
    cfg = toy_cfg(BOTTOM_UP_BACKBONE="neck_test_no_channels_backbone")
    _raises(cfg, "MODEL.FPN.IN_FEATURES", "'res3'", "None channels")


def test_bottom_up_backbone_name():
    _raises(toy_cfg(BOTTOM_UP_BACKBONE="no_such_backbone"),
            "MODEL.FPN.BOTTOM_UP_BACKBONE", "'no_such_backbone'", "build_resnet_backbone")
    _raises(toy_cfg(BOTTOM_UP_BACKBONE="build_custom_fpn_backbone"),
            "MODEL.FPN.BOTTOM_UP_BACKBONE", "'build_custom_fpn_backbone'")
    _raises(toy_cfg(BOTTOM_UP_BACKBONE="neck_test_not_a_backbone"),
            "MODEL.FPN.BOTTOM_UP_BACKBONE", "'neck_test_not_a_backbone'", "Conv2d")


def test_config_without_plugin_keys_says_what_to_call():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_custom_fpn_backbone"
    _raises(cfg, "add_fpn_plugin_config")


def test_python_top_block_modules_are_checked():
    bottom_up = ToyBackbone()  # res5 has 40 channels
    kwargs = dict(bottom_up=bottom_up, in_features=["res3", "res4", "res5"], out_channels=32)
    with pytest.raises(ValueError, match=r"top_block.p6 takes 32 channels .* 'res5' has 40"):
        CustomFPN(**kwargs, top_block=LastLevelP6P7(32, 32, in_feature="res5"))
    with pytest.raises(ValueError, match=r"top_block.in_feature='p9'"):
        CustomFPN(**kwargs, top_block=LastLevelP6P7(32, 32, in_feature="p9"))
    with pytest.raises(ValueError, match="num_levels"):
        CustomFPN(**kwargs, top_block=torch.nn.Identity())
    # The matching module is accepted; a name works like the config value.
    CustomFPN(**kwargs, top_block=LastLevelP6P7(40, 32, in_feature="res5"))
    assert CustomFPN(**kwargs, top_block="maxpool").top_block.in_feature == "p5"
