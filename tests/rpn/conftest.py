"""Shared builders for the per-level RPN tests (fixtures: test folders are not packages)."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

import fpn_plugin  # noqa: F401  (registers PerLevelRPN / PerLevelRPNHead)
from fpn_plugin import add_fpn_plugin_config

FPN_LEVELS = ["p2", "p3", "p4", "p5", "p6"]


def _fpn_cfg(channels=8):
    """Detectron2's Base-RCNN-FPN RPN settings (built-in RPN + StandardRPNHead)."""
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.MODEL.RPN.IN_FEATURES = list(FPN_LEVELS)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    return cfg


def _fpn_shapes(channels=8):
    return {f: ShapeSpec(channels=channels, stride=2 ** (i + 2)) for i, f in enumerate(FPN_LEVELS)}


def _fpn_features(image_hw, num_images=2, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    shapes = [(-(-h // 2 ** (i + 2)), -(-w // 2 ** (i + 2))) for i in range(len(FPN_LEVELS))]
    return {
        f: torch.randn(num_images, channels, fh, fw, generator=g)
        for f, (fh, fw) in zip(FPN_LEVELS, shapes)
    }


def _set_key(cfg, dotted_key, value):
    """``cfg.<dotted_key> = value``, bypassing yacs' type check (tests set bad values too)."""
    node = cfg
    *parents, leaf = dotted_key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.fixture
def set_key():
    return _set_key


@pytest.fixture
def fpn_cfg():
    return _fpn_cfg


@pytest.fixture
def fpn_shapes():
    return _fpn_shapes


@pytest.fixture
def fpn_features():
    return _fpn_features
