"""
Multi-level ("adaptive") ROI feature pooling (PANet): pure tensor logic, no Detectron2 glue.

Detectron2's ``ROIPooler`` pools each ROI from the one pyramid level its size maps to.
Adaptive pooling pools every ROI from every level, so a small ROI also sees the coarse,
semantically strong levels and a large one the fine, well-localised levels; the head then
fuses the levels (after a per-level conv) element-wise
(:func:`fpn_plugin.layers.fuse_levels`).
"""
from typing import List

import torch
from torch import nn
from torchvision.ops import roi_align

__all__ = ["roi_align_all_levels", "MultiLevelROIAlign"]


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


class MultiLevelROIAlign(nn.Module):
    """
    The adaptive pooling as a module (no parameters): :func:`roi_align_all_levels` with its
    settings fixed at construction.
    """

    output_size: torch.jit.Final[int]
    sampling_ratio: torch.jit.Final[int]
    aligned: torch.jit.Final[bool]

    def __init__(self, output_size: int, scales: List[float], sampling_ratio: int, aligned: bool):
        """
        Args:
            output_size (int): R, side of the pooled maps.
            scales (list[float]): 1 / stride of each level, in the order features come.
            sampling_ratio (int): samples per output bin (0: adaptive).
            aligned (bool): ROIAlignV2 (True) or legacy ROIAlign (False).
        """
        super().__init__()
        self.output_size = int(output_size)
        self.scales: List[float] = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, features: List[torch.Tensor], rois: torch.Tensor) -> List[torch.Tensor]:
        """
        Args:
            features (list[Tensor]): L maps ``(N, C, Hl, Wl)``, in ``scales`` order.
            rois (Tensor): ``(M, 5)`` rows ``(batch index, x0, y0, x1, y1)``.

        Returns:
            list[Tensor]: L tensors ``(M, C, R, R)``.
        """
        return roi_align_all_levels(
            features, rois, self.output_size, self.scales, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
