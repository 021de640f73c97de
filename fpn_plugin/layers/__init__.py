"""
Layers shared by the plugin's components (neck, RPN head, mask heads): conv factories and the
fusion of same-shape maps, with the one vocabulary of fusion and interpolation names, and the
sparse-product ROIAlign of the CPU fast training path.
"""
from .conv import conv3x3
from .fusion import (
    FUSE_TYPES,
    AvgFusion,
    MaxFusion,
    SumFusion,
    WeightedFusion,
    build_fusion,
    canonical_fuse_type,
    check_fuse_type,
    fuse_levels,
)
from .resize import INTERPOLATION_MODES, align_corners, resize_to
from .roi_align import SparseROIAlign, restore_roi_align, use_sparse_roi_align
from .scriptable import prepared_copy

__all__ = [
    "conv3x3",
    "FUSE_TYPES",
    "INTERPOLATION_MODES",
    "SumFusion",
    "AvgFusion",
    "MaxFusion",
    "WeightedFusion",
    "build_fusion",
    "canonical_fuse_type",
    "check_fuse_type",
    "fuse_levels",
    "prepared_copy",
    "SparseROIAlign",
    "use_sparse_roi_align",
    "restore_roi_align",
    "align_corners",
    "resize_to",
]
