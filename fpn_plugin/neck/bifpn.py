"""
``BiFPN``: the neck of EfficientDet (Tan, Pang and Le, *EfficientDet: Scalable and Efficient
Object Detection*, CVPR 2020, Sec. 3 and Fig. 2d/3), chosen by ``MODEL.FPN.BIFPN.ENABLED``.

The pyramid is ``lateral 1x1 convs -> NUM_CELLS BiFPN cells -> top block``:

- the 1x1 lateral convs (Detectron2's ``fpn_lateral{stage}``, with the neck's norm) bring every
  backbone feature to the width ``MODEL.FPN.OUT_CHANNELS`` (the paper's resampling of the
  backbone features to the BiFPN width);
- each :class:`BiFPNCell` runs a top-down path and then a bottom-up path over the input levels;
  every node fuses its inputs (``MODEL.FPN.FUSE_TYPE``; "weighted" is the paper's fast
  normalized fusion, :class:`~fpn_plugin.layers.fusion.WeightedFusion`) and applies a
  depthwise-separable 3x3 conv, the neck's norm and swish (SiLU);
- the top block (``MODEL.FPN.TOP_BLOCK``, max-pool P6 for Mask R-CNN) then adds the extra
  levels from the last cell's coarsest level, as for the other necks, so the outputs are the
  same "p<stage>" maps with the same strides (P2-P6 by default).

Differences from the paper, on purpose: EfficientDet feeds P3-P7 into the cells (P6/P7 made
from the backbone beforehand); here the cells run over the input levels (P2-P5) and the extra
levels come after them from the top block, so ``TOP_BLOCK`` keeps its meaning and Mask
R-CNN's heads take the neck unchanged. Downsampling between levels is a 3x3 stride-2 max
pool and upsampling ``MODEL.FPN.UPSAMPLE_MODE`` interpolation to the finer level's size.

There is no setting in which this neck computes Detectron2's FPN: with ``NUM_CELLS: 0`` it is
the lateral convs and the top block only (Detectron2's FPN always adds the top-down merge and
the 3x3 output convs). What holds instead (tests/neck/test_bifpn.py): the lateral convs are
Detectron2's (names, init, computation), so a Detectron2 FPN checkpoint's lateral and backbone
weights load into it; one cell already lets every output level see every input level.
"""
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from torch import Tensor, nn

from ..layers import build_fusion, resize_to
from .build import register_neck_variant
from .fpn import CustomFPN, PathwaySpec, lateral_conv

__all__ = ["BiFPN", "BiFPNCell", "SeparableConv3x3"]


class SeparableConv3x3(nn.Module):
    """
    Depthwise-separable 3x3 conv (EfficientDet's node conv): a depthwise 3x3 conv (one filter
    per channel, no bias), a pointwise 1x1 conv (bias only without norm), the norm, swish.
    `(N, C, H, W)` -> `(N, C, H, W)`. Xavier-initialised like the neck's other convs.
    """

    def __init__(self, channels: int, norm=""):
        """
        Args:
            channels (int): C, input and output channels.
            norm (str): any name :func:`detectron2.layers.get_norm` accepts, "" for none.
        """
        super().__init__()
        self.depthwise = Conv2d(
            channels, channels, kernel_size=3, padding=1, groups=channels, bias=False
        )
        self.pointwise = Conv2d(
            channels, channels, kernel_size=1, bias=not norm,
            norm=get_norm(norm, channels), activation=nn.SiLU(),
        )
        weight_init.c2_xavier_fill(self.depthwise)
        weight_init.c2_xavier_fill(self.pointwise)

    def forward(self, x: Tensor) -> Tensor:
        """`(N, C, H, W)` -> `(N, C, H, W)`."""
        return self.pointwise(self.depthwise(x))


def downsample(x: Tensor) -> Tensor:
    """
    Halve the resolution for a bottom-up edge: 3x3 stride-2 max pool (padding 1), so
    `(N, C, H, W)` -> `(N, C, ceil(H / 2), ceil(W / 2))`, the size a stride-2 backbone stage
    gives the next level.
    """
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BiFPNCell(nn.Module):
    """
    One BiFPN layer over L >= 2 levels ``P_0`` (finest) .. ``P_{L-1}`` (coarsest), all with C
    channels (EfficientDet, Fig. 2d; ``conv`` is a :class:`SeparableConv3x3`, ``fuse`` the
    neck's fusion, one weight row per node with "weighted"):

    - top-down: ``T_{L-1} = P_{L-1}``; ``T_i = conv(fuse(P_i, up(T_{i+1})))`` for i = L-2 .. 0;
    - bottom-up: ``O_0 = T_0``; ``O_i = conv(fuse(P_i, T_i, down(O_{i-1})))`` for the
      intermediate levels (the extra same-level edge from the cell's input ``P_i``);
      ``O_{L-1} = conv(fuse(P_{L-1}, down(O_{L-2})))``.

    Parameters: ``td_convs.{j}`` (the top-down node of level L-2-j), ``mid_convs.{j}`` (the
    bottom-up node of level j+1), ``top_conv``, and with weighted fusion ``td_fusion.weight``
    `(L-1, 2)`, ``mid_fusion.weight`` `(L-2, 3)`, ``top_fusion.weight`` `(1, 2)`.
    """

    num_levels: torch.jit.Final[int]
    upsample_mode: torch.jit.Final[str]

    def __init__(
        self,
        num_levels: int,
        channels: int,
        norm="",
        fuse_type: str = "weighted",
        upsample_mode: str = "nearest",
        eps: float = 1e-4,
    ):
        """
        Args:
            num_levels (int): L >= 2, levels the cell runs over.
            channels (int): C of every level.
            norm (str): norm of the node convs.
            fuse_type (str): "weighted" (fast normalized fusion), "sum" or "avg".
            upsample_mode (str): "nearest" | "bilinear", for the top-down edges.
            eps (float): epsilon of "weighted" fusion.
        """
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"a BiFPN cell needs at least 2 levels, got {num_levels}")
        self.num_levels = num_levels
        self.upsample_mode = upsample_mode
        self.td_convs = nn.ModuleList(
            [SeparableConv3x3(channels, norm) for _ in range(num_levels - 1)]
        )
        self.mid_convs = nn.ModuleList(
            [SeparableConv3x3(channels, norm) for _ in range(num_levels - 2)]
        )
        self.top_conv = SeparableConv3x3(channels, norm)
        self.td_fusion = build_fusion(fuse_type, num_levels - 1, 2, eps)
        # None with two levels (no intermediate node): TorchScript prunes it, and no weight
        # is left without a gradient.
        self.mid_fusion = (
            build_fusion(fuse_type, num_levels - 2, 3, eps) if num_levels > 2 else None
        )
        self.top_fusion = build_fusion(fuse_type, 1, 2, eps)

    def forward(self, levels: List[Tensor]) -> List[Tensor]:
        """
        Args:
            levels (list[Tensor]): L maps, high to low resolution, level i
                `(N, C, H_i, W_i)` with ``H_{i+1} = ceil(H_i / 2)`` (likewise W).

        Returns:
            list[Tensor]: the L output maps, same shapes.
        """
        n = self.num_levels
        # Top-down; top_down[k] is T of level n-1-k.
        prev = levels[n - 1]
        top_down: List[Tensor] = [prev]
        for j, conv in enumerate(self.td_convs):
            x = levels[n - 2 - j]
            up = resize_to(prev, [x.shape[-2], x.shape[-1]], self.upsample_mode)
            prev = conv(self.td_fusion([x, up], j))
            top_down.append(prev)
        # Bottom-up; the finest top-down node is already the finest output.
        outputs: List[Tensor] = [prev]
        if self.mid_fusion is not None:
            for j, conv in enumerate(self.mid_convs):
                level = j + 1
                fused = self.mid_fusion(
                    [levels[level], top_down[n - 1 - level], downsample(outputs[j])], j
                )
                outputs.append(conv(fused))
        fused = self.top_fusion([levels[n - 1], downsample(outputs[n - 2])], 0)
        outputs.append(self.top_conv(fused))
        return outputs


@register_neck_variant("BIFPN.ENABLED")
class BiFPN(CustomFPN):
    """
    The BiFPN neck: lateral 1x1 convs, ``num_cells`` :class:`BiFPNCell` s (``cells.{k}``),
    the top block. Same constructor as :class:`CustomFPN` plus ``num_cells``; its fusion
    (``fuse_type``) serves the cells' nodes and defaults to "weighted" (the paper's).

    Output: "p<stage>" -> `(N, out_channels, H / 2**stage, W / 2**stage)`, as CustomFPN.
    """

    @configurable
    def __init__(self, *, num_cells: int = 3, fuse_type: str = "weighted", **kwargs):
        """
        Args:
            num_cells (int): BiFPN cells stacked after the lateral convs, >= 0 (EfficientDet
                D0-D7 use 3-8).
            fuse_type (str): as :class:`CustomFPN`'s (default "weighted", the paper's); it
                fuses the cells' nodes.
            kwargs: the other arguments of :class:`CustomFPN` (``bottom_up``,
                ``in_features``, ``out_channels``, ``norm``, ...); ``norm`` also normalises
                the cells' node convs.

        Raises:
            ValueError: an invalid argument, naming its config key (``MODEL.FPN.*``).
        """
        if isinstance(num_cells, bool) or not isinstance(num_cells, int) or num_cells < 0:
            raise ValueError(f"MODEL.FPN.BIFPN.NUM_CELLS={num_cells!r} must be an int >= 0")
        in_features = list(kwargs.get("in_features", ()))
        if num_cells > 0 and len(in_features) < 2:
            raise ValueError(
                f"MODEL.FPN.BIFPN.NUM_CELLS={num_cells} needs at least 2 input levels, but "
                f"MODEL.FPN.IN_FEATURES={in_features!r}"
            )
        super().__init__(fuse_type=fuse_type, **kwargs)
        spec = self._pathway_spec
        self.cells = nn.ModuleList(
            [
                BiFPNCell(
                    len(spec.stages), spec.out_channels, spec.norm, spec.fuse_type,
                    spec.upsample_mode, spec.eps,
                )
                for _ in range(num_cells)
            ]
        )

    @classmethod
    def from_config(cls, cfg, input_shape, *, bottom_up):
        args = super().from_config(cfg, input_shape, bottom_up=bottom_up)
        args["num_cells"] = cfg.MODEL.FPN.BIFPN.NUM_CELLS
        return args

    def _make_top_down(
        self, spec: PathwaySpec
    ) -> Tuple[List[nn.Module], List[nn.Module], Optional[nn.Module]]:
        # Only the lateral convs: the cells hold the top-down merges and the node convs.
        (laterals,) = self._add_level_convs(
            spec.stages,
            lambda level: (lateral_conv(spec.in_channels[level], spec.out_channels, spec.norm),),
            ("fpn_lateral",),
        )
        return laterals, [], None

    def _top_down(self, bottom_up_features: Dict[str, Tensor]) -> List[Tensor]:
        """
        The lateral convs (no top-down merge here: the cells hold it).

        Returns:
            list[Tensor]: ``lateral_i(C_i)``, high to low resolution, each
            `(N, out_channels, Hi, Wi)`.
        """
        results: List[Tensor] = []
        # lateral_convs is in top-down order (coarsest first).
        for idx, conv in enumerate(self.lateral_convs):
            results.insert(0, conv(bottom_up_features[self.in_features[-idx - 1]]))
        return results

    def _extra_pathways(self, levels: List[Tensor]) -> List[Tensor]:
        """
        Args:
            levels (list[Tensor]): the lateral maps, high to low resolution.

        Returns:
            list[Tensor]: the last cell's outputs, same shapes (``levels`` with no cells).
        """
        for cell in self.cells:
            levels = cell(levels)
        return levels

