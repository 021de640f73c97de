"""Resizing a map by interpolation: the one set of mode names the neck and mask heads accept."""
from typing import List, Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ["INTERPOLATION_MODES", "align_corners", "resize_to"]

INTERPOLATION_MODES = ("nearest", "bilinear")


def align_corners(mode: str) -> Optional[bool]:
    """``align_corners`` for ``mode``: False for "bilinear" (half-pixel centres), None otherwise."""
    return False if mode == "bilinear" else None


def resize_to(x: Tensor, size: List[int], mode: str) -> Tensor:
    """
    Args:
        x (Tensor): `(N, C, H, W)`.
        size (list[int]): the target `(H', W')`.
        mode (str): one of :data:`INTERPOLATION_MODES`.

    Returns:
        Tensor: `(N, C, H', W')`.
    """
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="nearest")
