"""Shared helpers of the neck tests: tiny configs, a scriptable toy backbone, padding."""
from typing import Dict, List

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.structures import ImageList
from torch import Tensor, nn

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.utils.registry import register

FOUR_LEVELS = ["res2", "res3", "res4", "res5"]

# Every neck variant (MODEL.FPN overrides), tested on the toy backbone by test_variants.py
# (shapes, gradients) and test_scripting.py (TorchScript, tracing).
VARIANTS = [
    {},
    {"FUSE_TYPE": "avg"},
    {"FUSE_TYPE": "weighted"},
    {"UPSAMPLE_MODE": "bilinear"},
    {"BOTTOM_UP_PATH": True},
    {"BOTTOM_UP_PATH": True, "FUSE_TYPE": "weighted", "NORM": "GN"},
    {"TOP_BLOCK": "none"},
    {"TOP_BLOCK": "p6p7_res5"},
    {"TOP_BLOCK": "p6p7_p5", "BOTTOM_UP_PATH": True},
    {"NORM": "BN"},
    {"NORM": "SyncBN"},
    {"NORM": "FrozenBN"},
    {"IN_FEATURES": ["res3", "res4", "res5"], "TOP_BLOCK": "p6p7_p5"},
    {"IN_FEATURES": ["res2", "res3", "res4"], "TOP_BLOCK": "maxpool"},
    {"BIFPN.ENABLED": True, "FUSE_TYPE": "weighted"},
    {"BIFPN.ENABLED": True, "BIFPN.NUM_CELLS": 1, "NORM": "GN", "UPSAMPLE_MODE": "bilinear"},
    {"BIFPN.ENABLED": True, "BIFPN.NUM_CELLS": 0},
    {"BIFPN.ENABLED": True, "FUSE_TYPE": "weighted", "IN_FEATURES": ["res4", "res5"],
     "TOP_BLOCK": "p6p7_p5"},
]


def variant_id(keys):
    return "-".join(f"{k}={v}" for k, v in keys.items()) or "parity"


def set_fpn_keys(cfg, fpn_keys):
    """Set ``cfg.MODEL.FPN`` keys, dotted ones ("BIFPN.NUM_CELLS") in their group."""
    for key, value in fpn_keys.items():
        *groups, name = key.split(".")
        node = cfg.MODEL.FPN
        for group in groups:
            node = node[group]
        setattr(node, name, value)


def r50_cfg():
    """Detectron2 defaults + Base-RCNN-FPN's FPN settings, plugin keys added (defaults)."""
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.MODEL.RESNETS.OUT_FEATURES = list(FOUR_LEVELS)
    cfg.MODEL.FPN.IN_FEATURES = list(FOUR_LEVELS)
    return cfg


def tiny_cfg(**fpn_overrides):
    """ResNet-18 with a 32-channel pyramid, every stage trainable; FPN keys overridable."""
    cfg = r50_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_custom_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    set_fpn_keys(cfg, fpn_overrides)
    return cfg


def padded(images: List[Tensor], size_divisibility: int) -> Tensor:
    """Batch images the way GeneralizedRCNN does (zero padding to the divisibility)."""
    return ImageList.from_tensors(images, size_divisibility).tensor


def randomize_(module: nn.Module, seed: int = 0, skip_prefix: str = "bottom_up.") -> None:
    """
    Overwrite parameters and buffers with random values (variances positive), as a trained
    checkpoint would have. The bottom-up backbone (Detectron2's own ResNet on both sides) is
    skipped by default to keep tests fast; its seed-dependent init still differs per build.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or (skip_prefix and name.startswith(skip_prefix)):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


class ToyBackbone(Backbone):
    """A scriptable bottom-up backbone: one strided conv per declared feature."""

    def __init__(self, strides=(4, 8, 16, 32), channels=(8, 16, 24, 40), in_channels=3,
                 names=("res2", "res3", "res4", "res5")):
        super().__init__()
        convs = []
        prev_stride, prev_channels = 1, in_channels
        for s, c in zip(strides, channels):
            step = max(s // prev_stride, 1)
            convs.append(nn.Conv2d(prev_channels, c or 4, 3, stride=step, padding=1))
            prev_stride, prev_channels = s, c or 4
        self.convs = nn.ModuleList(convs)
        self.names = tuple(names)  # static length: TorchScript zips it with the ModuleList
        self._out_features = list(names)
        self._out_feature_strides = dict(zip(names, strides))
        self._out_feature_channels = dict(zip(names, channels))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name, conv in zip(self.names, self.convs):
            x = torch.relu(conv(x))
            out[name] = x
        return out

    def output_shape(self):
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


@register(BACKBONE_REGISTRY)
def neck_test_toy_backbone(cfg, input_shape):
    return ToyBackbone(in_channels=input_shape.channels)


@register(BACKBONE_REGISTRY)
def neck_test_stride12_backbone(cfg, input_shape):
    return ToyBackbone(strides=(4, 12, 24, 48))


@register(BACKBONE_REGISTRY)
def neck_test_no_channels_backbone(cfg, input_shape):
    return ToyBackbone(channels=(8, None, 24, 32))


@register(BACKBONE_REGISTRY)
def neck_test_not_a_backbone(cfg, input_shape):
    return nn.Conv2d(3, 8, 3)


def toy_cfg(**fpn_overrides):
    """The plugin's generic builder on ToyBackbone (same feature names as ResNet), 32 channels."""
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_custom_fpn_backbone"
    cfg.MODEL.FPN.BOTTOM_UP_BACKBONE = "neck_test_toy_backbone"
    cfg.MODEL.FPN.IN_FEATURES = list(FOUR_LEVELS)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    set_fpn_keys(cfg, fpn_overrides)
    return cfg
