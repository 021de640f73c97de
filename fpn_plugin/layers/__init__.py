"""
Layers shared by the plugin's components (neck, RPN head, mask heads): conv factories and the
fusion of same-shape maps, with the one vocabulary of fusion and interpolation names.
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
    "align_corners",
    "resize_to",
]
