"""
Config keys of fpn_plugin.mask_head, added to ``cfg.MODEL.ROI_MASK_HEAD``.

Detectron2's own keys keep their meaning: NUM_CONV, CONV_DIM, NORM, CLS_AGNOSTIC_MASK,
POOLER_RESOLUTION, POOLER_SAMPLING_RATIO, POOLER_TYPE. Every default here reproduces
Detectron2's ``MaskRCNNConvUpsampleHead``.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_mask_head_config", "UPSAMPLE_MODES", "LEVEL_FUSE_TYPES", "ADAPTIVE_POOLER_TYPES"]

UPSAMPLE_MODES = ("deconv", "bilinear", "nearest")
LEVEL_FUSE_TYPES = ("max", "sum", "mean")
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
      first conv: "max" (PANet's element-wise max), "sum" or "mean".
    - ``PANET.FUSED_FC`` (True): add PANet's fully-connected branch: from the second-to-last
      conv, two 3x3 convs (the second halves the channels) and an fc layer predict one
      class-agnostic (2R x 2R) mask logit map that is added to every class's FCN logits.
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
    return cfg
