"""
Small versions of the repository's configs for the deployment tests, and sample inputs.

:data:`SMALL` shrinks sizes only (ResNet depth and widths, head widths, classes, detections,
test resolution); it names no component and no component switch, so a small config builds the
same component classes as the full one (names, neck variant, top block, fusion, RPN head
layout and top-k mode, mask head and its pooling), just narrower.
"""
import glob
import os

import cv2
import numpy as np
import torch
from detectron2.modeling import build_model

from fpn_plugin.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every model config of the repository (the Base-*.yaml files are only inherited from).
CONFIGS = sorted(os.path.relpath(p, ROOT)
                 for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))

SMALL = {
    "MODEL.DEVICE": "cpu",
    "MODEL.WEIGHTS": "",
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,  # what depth 18 requires
    "MODEL.FPN.OUT_CHANNELS": 32,  # a multiple of 32: GroupNorm configs keep their norm
    "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 16,
    "MODEL.ROI_HEADS.NUM_CLASSES": 3,
    "TEST.DETECTIONS_PER_IMAGE": 20,
    "INPUT.MIN_SIZE_TEST": 64,
    "INPUT.MAX_SIZE_TEST": 128,
}


def small_cfg(rel_path, **extra):
    """The config at ``rel_path`` (relative to the repository) with :data:`SMALL` applied."""
    opts = []
    for key, value in dict(SMALL, **extra).items():
        opts += [key, str(value)]
    return load_config(os.path.join(ROOT, rel_path), opts)


def spread_predictions_(model, seed=0):
    """
    Re-draw the final predictors with a larger spread: at their tiny initial scale every
    score is about 1/(classes + 1) and every mask probability about 0.5, so an exact-equality
    check would compare nearly constant outputs. Returns the model.
    """
    gen = torch.Generator().manual_seed(seed)
    heads = model.roi_heads
    layers = [(heads.box_predictor.cls_score, 0.2), (heads.box_predictor.bbox_pred, 0.05)]
    if hasattr(heads, "mask_head"):
        layers.append((heads.mask_head.predictor, 0.2))
    with torch.no_grad():
        for layer, std in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
    return model


def small_model(rel_path, seed=0, **extra):
    """An eval-mode small model of the config, random weights with spread-out predictions."""
    torch.manual_seed(seed)
    return spread_predictions_(build_model(small_cfg(rel_path, **extra)).eval(), seed)


def sample_images(seed=1):
    """Two model inputs of different sizes: float32 (3, 64, 96) and (3, 100, 70)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 96, generator=gen) * 255, torch.rand(3, 100, 70, generator=gen) * 255]


def write_images(folder, num=2, seed=0):
    """``num`` BGR PNGs of different sizes in ``folder``; returns their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(num):
        image = rng.integers(0, 255, size=(60 + 12 * i, 90 - 8 * i, 3), dtype=np.uint8)
        cv2.rectangle(image, (10, 12), (50, 40), (30, 200, 90), -1)
        path = os.path.join(folder, f"img_{i}.png")
        cv2.imwrite(path, image)
        paths.append(path)
    return paths


def assert_same_detections(got, want):
    """Bitwise equality of what the deployed model returns (boxes, scores, classes, masks)."""
    assert len(want) > 0
    assert got.image_size == want.image_size
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.pred_classes, want.pred_classes)
    assert torch.equal(got.pred_masks, want.pred_masks)
