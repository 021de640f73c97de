"""The FPN neck: top-down (and optional bottom-up) feature pyramid, and its backbone builders."""
from .build import build_custom_fpn_backbone, build_resnet_custom_fpn_backbone
from .fpn import CustomFPN
from .fusion import AvgFusion, SumFusion, WeightedFusion, build_fusion
from .top_blocks import build_top_block

__all__ = [
    "CustomFPN",
    "build_resnet_custom_fpn_backbone",
    "build_custom_fpn_backbone",
    "SumFusion",
    "AvgFusion",
    "WeightedFusion",
    "build_fusion",
    "build_top_block",
]
