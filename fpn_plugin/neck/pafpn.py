"""
``PAFPN``: the neck with PANet's bottom-up path augmentation (Liu et al., *Path Aggregation
Network for Instance Segmentation*) after the top-down pathway. Chosen by
``MODEL.FPN.BOTTOM_UP_PATH: True``.

It adds, per input level but the first (stage s), ``pan_downsample{s}`` (3x3 stride-2 conv)
and ``pan_output{s}`` (3x3 conv), both with the neck's norm, and ``pan_fusion.weight`` with
weighted fusion; everything else is :class:`~fpn_plugin.neck.fpn.CustomFPN`'s (same
constructor, same config keys).
"""
from typing import List

from torch import Tensor

from ..layers import build_fusion, conv3x3
from .build import register_neck_variant
from .fpn import CustomFPN, PathwaySpec

__all__ = ["PAFPN"]


@register_neck_variant("BOTTOM_UP_PATH")
class PAFPN(CustomFPN):
    """
    :class:`CustomFPN` + PANet's bottom-up path: ``N_first = P_first``;
    ``N_i = pan_output_i(fuse(P_i, pan_downsample_i(N_{i-1})))``, replacing P_i (fused with
    the neck's ``fuse_type``). The top block then reads the augmented levels.
    """

    _LEVEL_CONV_LISTS = CustomFPN._LEVEL_CONV_LISTS + (
        ("pan_downsample_convs", "pan_downsample"),
        ("pan_output_convs", "pan_output"),
    )

    def _make_extra_pathways(self, spec: PathwaySpec) -> None:
        # High to low resolution (the bottom-up direction), from the second input level on.
        channels, norm = spec.out_channels, spec.norm
        self.pan_downsample_convs, self.pan_output_convs = self._add_level_convs(
            spec.stages[1:],
            lambda level: (
                conv3x3(channels, channels, norm, stride=2),
                conv3x3(channels, channels, norm),
            ),
            ("pan_downsample", "pan_output"),
        )
        num_merges = len(spec.stages) - 1
        self.pan_fusion = (
            build_fusion(spec.fuse_type, num_merges, 2, spec.eps) if num_merges else None
        )

    def _extra_pathways(self, levels: List[Tensor]) -> List[Tensor]:
        """
        Args:
            levels (list[Tensor]): P_i of the input levels, high to low resolution, each
                `(N, C, Hi, Wi)`.

        Returns:
            list[Tensor]: N_i, same shapes.
        """
        if self.pan_fusion is None:
            return levels
        prev_features = levels[0]
        augmented = [prev_features]
        for idx, (down_conv, out_conv) in enumerate(
            zip(self.pan_downsample_convs, self.pan_output_convs)
        ):
            fused = self.pan_fusion([levels[idx + 1], down_conv(prev_features)], idx)
            prev_features = out_conv(fused)
            augmented.append(prev_features)
        return augmented
