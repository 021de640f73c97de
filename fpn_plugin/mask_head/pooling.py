"""
Multi-level ("adaptive") ROI feature pooling (PANet): pure tensor logic, no Detectron2 glue.

Detectron2's ``ROIPooler`` pools each ROI from the one pyramid level its size maps to.
Adaptive pooling pools every ROI from every level, so a small ROI also sees the coarse,
semantically strong levels and a large one the fine, well-localised levels; the head then
fuses the levels (after a per-level conv) with an element-wise max, sum or mean.
"""
from typing import List

import torch
from torchvision.ops import roi_align

__all__ = ["roi_align_all_levels", "fuse_levels"]


def roi_align_all_levels(
    features: List[torch.Tensor],
    rois: torch.Tensor,
    output_size: int,
    scales: List[float],
    sampling_ratio: int,
    aligned: bool,
) -> List[torch.Tensor]:
    """
    ROIAlign every ROI on every feature level.

    Args:
        features (list[Tensor]): L maps ``(N, C, Hl, Wl)``, one per level.
        rois (Tensor): ``(M, 5)`` rows ``(batch index, x0, y0, x1, y1)`` in image pixels
            (``detectron2.modeling.poolers.convert_boxes_to_pooler_format``).
        output_size (int): R, side of the pooled maps.
        scales (list[float]): L spatial scales (1 / stride of each level).
        sampling_ratio (int): samples per output bin (0: adaptive), as ROIAlign.
        aligned (bool): True for ROIAlignV2's half-pixel shift, False for legacy ROIAlign.

    Returns:
        list[Tensor]: L tensors ``(M, C, R, R)``, ROI i's features from level l at ``[l][i]``.
    """
    if len(features) != len(scales):
        # String concatenation, not f-strings with conversions: TorchScript compiles this.
        raise ValueError(
            "got " + str(len(features)) + " feature levels but " + str(len(scales)) + " scales"
        )
    pooled: List[torch.Tensor] = []
    for level, x in enumerate(features):
        pooled.append(
            roi_align(
                x,
                rois.to(dtype=x.dtype),
                output_size=(output_size, output_size),
                spatial_scale=scales[level],
                sampling_ratio=sampling_ratio,
                aligned=aligned,
            )
        )
    return pooled


def fuse_levels(per_level: List[torch.Tensor], fuse_type: str) -> torch.Tensor:
    """
    Fuse same-shaped per-level ROI features element-wise.

    Args:
        per_level (list[Tensor]): L >= 1 tensors ``(M, C, R, R)``.
        fuse_type (str): "max" (PANet), "sum" or "mean".

    Returns:
        Tensor: ``(M, C, R, R)``.
    """
    if len(per_level) == 0:
        raise ValueError("fuse_levels needs at least one level")
    fused = per_level[0]
    for x in per_level[1:]:
        if fuse_type == "max":
            fused = torch.max(fused, x)
        else:
            fused = fused + x
    if fuse_type == "mean":
        fused = fused / float(len(per_level))
    elif fuse_type != "max" and fuse_type != "sum":
        raise ValueError("fuse_type must be 'max', 'sum' or 'mean', got '" + fuse_type + "'")
    return fused
