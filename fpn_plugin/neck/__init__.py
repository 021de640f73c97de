"""
The FPN neck: the top-down feature pyramid (``CustomFPN``), its variants (``PAFPN``: PANet's
bottom-up path; ``BiFPN``: EfficientDet's bidirectional cells), named top blocks, and the
backbone builders that put it on a bottom-up backbone.
"""
from ..layers.fusion import AvgFusion, MaxFusion, SumFusion, WeightedFusion, build_fusion
from .bifpn import BiFPN
from .build import build_custom_fpn_backbone, build_resnet_custom_fpn_backbone
from .fpn import CustomFPN
from .pafpn import PAFPN
from .top_blocks import build_top_block

__all__ = [
    "CustomFPN",
    "PAFPN",
    "BiFPN",
    "build_resnet_custom_fpn_backbone",
    "build_custom_fpn_backbone",
    "SumFusion",
    "AvgFusion",
    "MaxFusion",
    "WeightedFusion",
    "build_fusion",
    "build_top_block",
]
