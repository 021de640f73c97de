"""
Config keys of fpn_plugin.mask_head, added to ``cfg.MODEL.ROI_MASK_HEAD``.

Detectron2's own keys keep their meaning: NUM_CONV, CONV_DIM, NORM, CLS_AGNOSTIC_MASK,
POOLER_RESOLUTION, POOLER_SAMPLING_RATIO, POOLER_TYPE. Every default here reproduces
Detectron2's ``MaskRCNNConvUpsampleHead``.
"""
from typing import Dict, List

from detectron2.config import CfgNode as CN
from detectron2.layers import get_norm

from ..layers import INTERPOLATION_MODES

__all__ = [
    "add_mask_head_config",
    "UPSAMPLE_MODES",
    "LEVEL_FUSE_TYPES",
    "ADAPTIVE_POOLER_TYPES",
    "head_args_from_config",
    "check_head_args",
]

# "deconv" (learned, Detectron2's) or one of the interpolation modes every component accepts.
UPSAMPLE_MODES = ("deconv",) + INTERPOLATION_MODES
# The fusion words (fpn_plugin.layers.FUSE_TYPES) PANet's level fusion implements; "mean" = "avg".
LEVEL_FUSE_TYPES = ("max", "sum", "avg")
ADAPTIVE_POOLER_TYPES = ("ROIAlignV2", "ROIAlign")


def add_mask_head_config(cfg):
    """
    Add fpn_plugin.mask_head's keys to ``cfg.MODEL.ROI_MASK_HEAD`` (in place; idempotent).

    Keys (default: meaning):

    - ``UPSAMPLE_MODE`` ("deconv"): how the head doubles the resolution before the predictor.
      "deconv": 2x2 stride-2 transposed conv (Detectron2's head); "bilinear" / "nearest":
      parameter-free 2x interpolation followed by a 3x3 conv (with ``NORM``), which avoids
      the checkerboard pattern a stride-2 deconv can leave.
    - ``PANET.ADAPTIVE_POOLING`` (True): ``PANetMaskHead`` pools every ROI from every input
      level and fuses the levels, instead of the one level its size maps to. Needs
      ``POOLER_TYPE: ""`` so StandardROIHeads hands the head all feature maps.
    - ``PANET.POOLER_TYPE`` ("ROIAlignV2"): ROI pooling op of the adaptive pooling,
      "ROIAlignV2" (aligned, half-pixel correct) or "ROIAlign" (legacy).
    - ``PANET.FUSE_TYPE`` ("max"): how the per-level features are fused after each level's own
      first conv: "max" (PANet's element-wise max), "sum" or "mean" (also spelled "avg", the
      neck's word).
    - ``PANET.FUSED_FC`` (True): add PANet's fully-connected branch: from the second-to-last
      conv, two 3x3 convs (the second halves the channels) and an fc layer predict one
      class-agnostic (2R x 2R) mask logit map that is added to every class's FCN logits.
    - ``MASK_SCORING.*``: the MaskIoU branch of ``MaskScoringHead`` (Mask Scoring R-CNN):
      ``NUM_CONV`` (4) 3x3 convs of ``CONV_DIM`` (256) channels, the last with stride 2, then
      ``NUM_FC`` (2) fc layers of ``FC_DIM`` (1024) and one IoU per class; ``LOSS_WEIGHT``
      (1.0) multiplies its L2 loss ``loss_maskiou``.
    """
    head = cfg.MODEL.ROI_MASK_HEAD
    head.UPSAMPLE_MODE = head.get("UPSAMPLE_MODE", "deconv")
    if "PANET" not in head:
        head.PANET = CN()
    panet = head.PANET
    panet.ADAPTIVE_POOLING = panet.get("ADAPTIVE_POOLING", True)
    panet.POOLER_TYPE = panet.get("POOLER_TYPE", "ROIAlignV2")
    panet.FUSE_TYPE = panet.get("FUSE_TYPE", "max")
    panet.FUSED_FC = panet.get("FUSED_FC", True)
    if "MASK_SCORING" not in head:
        head.MASK_SCORING = CN()
    scoring = head.MASK_SCORING
    scoring.NUM_CONV = scoring.get("NUM_CONV", 4)
    scoring.CONV_DIM = scoring.get("CONV_DIM", 256)
    scoring.NUM_FC = scoring.get("NUM_FC", 2)
    scoring.FC_DIM = scoring.get("FC_DIM", 1024)
    scoring.LOSS_WEIGHT = scoring.get("LOSS_WEIGHT", 1.0)
    return cfg


def head_args_from_config(cfg, input_shape) -> Dict[str, object]:
    """
    The constructor arguments every plugin mask head takes, from ``cfg`` (a pure mapping; the
    heads validate them, naming these keys).

    Raises:
        ValueError: MODEL.ROI_MASK_HEAD.NUM_CONV < 0, the one value with no ``conv_dims``
            list to stand for it.
    """
    head = cfg.MODEL.ROI_MASK_HEAD
    if head.NUM_CONV < 0:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.NUM_CONV must be >= 0, got {head.NUM_CONV}")
    return {
        "input_shape": input_shape,
        "num_classes": 1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        "conv_dims": [head.CONV_DIM] * (head.NUM_CONV + 1),  # +1: the upsampling layer
        "conv_norm": head.NORM,
        "upsample_mode": head.UPSAMPLE_MODE,
        "vis_period": cfg.VIS_PERIOD,
    }


def check_head_args(
    head_name: str,
    num_classes: int,
    conv_dims: List[int],
    conv_norm: str,
    upsample_mode: str,
    resolution: int,
    min_convs: int = 0,
) -> None:
    """
    Validate the arguments every plugin mask head takes; raise ``ValueError`` naming the key
    that sets each (``conv_dims`` is MODEL.ROI_MASK_HEAD.NUM_CONV convs of CONV_DIM channels,
    then the upsampling layer's).

    Args:
        head_name (str): for messages.
        resolution (int): R of the `(B, C, R, R)` ROI features the head sees
            (MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION).
        min_convs (int): the fewest 3x3 convs the head needs before the upsampling.
    """
    num_conv = len(conv_dims) - 1
    if num_conv < min_convs:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.NUM_CONV must be >= {min_convs} for {head_name}, got "
            f"{num_conv} (conv_dims={list(conv_dims)}: the convs, then the upsampling layer)"
        )
    for dim in conv_dims:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"MODEL.ROI_MASK_HEAD.CONV_DIM must be > 0, got {dim}")
    if isinstance(resolution, int) and resolution <= 0:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION must be > 0, got {resolution}")
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.UPSAMPLE_MODE must be one of {UPSAMPLE_MODES}, "
            f"got {upsample_mode!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES must be > 0, got {num_classes}")
    if conv_norm:
        # get_norm raises KeyError for unknown names and GroupNorm fails on channel counts
        # it cannot split; surface both as config errors now, not at the first forward.
        for dim in set(conv_dims):
            try:
                get_norm(conv_norm, dim)
            except Exception as e:
                raise ValueError(
                    f"MODEL.ROI_MASK_HEAD.NORM={conv_norm!r} is not usable with "
                    f"MODEL.ROI_MASK_HEAD.CONV_DIM={dim}: {e}"
                ) from e
