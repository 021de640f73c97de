"""
``CustomFPN``: the feature-pyramid neck (top-down pathway) on a bottom-up backbone, with its
parts injected: the fusion of each merge (by name, see :mod:`fpn_plugin.layers.fusion`), the
upsampling mode and the top block (a name or a module, see :mod:`.top_blocks`). Pathway
variants subclass it (:class:`~fpn_plugin.neck.pafpn.PAFPN` adds PANet's bottom-up path).

Parity contract (all defaults): same parameter names as Detectron2's ``FPN``
(``fpn_lateral{stage}``, ``fpn_output{stage}``, ``top_block.*``, ``bottom_up.*``), the same
initialisation in the same random-number order, and the same forward computation, so
Detectron2 FPN checkpoints load strictly and give identical pyramids. Variants only add
parameters when enabled (``top_down_fusion.weight`` for weighted fusion).
"""
import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.backbone import Backbone
from torch import Tensor, nn

from ..layers import (
    INTERPOLATION_MODES,
    build_fusion,
    check_fuse_type,
    conv3x3,
    prepared_copy,
    resize_to,
)
from .top_blocks import resolve_top_block

__all__ = ["CustomFPN", "NECK_FUSE_TYPES", "lateral_conv"]

# The fusion words (fpn_plugin.layers.FUSE_TYPES) the neck implements; "mean" = "avg".
NECK_FUSE_TYPES = ("sum", "avg", "weighted")


class PathwaySpec(NamedTuple):
    """What a neck's pathway modules are built from (``CustomFPN._make_top_down`` and
    ``_make_extra_pathways``, the hooks a neck variant overrides)."""

    stages: List[int]  # stage of each input level, high to low resolution
    in_channels: List[int]  # channels of each input level
    out_channels: int  # the neck's
    norm: Any  # the neck's (a get_norm name or callable)
    fuse_type: str  # the neck's fusion word (canonical)
    eps: float  # epsilon of "weighted" fusion
    upsample_mode: str  # the neck's top-down upsampling


class CustomFPN(Backbone):
    """
    Feature pyramid (:paper:`FPN`) built on the features of a bottom-up backbone.

    For input features C_i (strides 2**i, high to low resolution):

    - top-down: ``L_i = lateral_i(C_i)``; ``M_last = L_last``;
      ``M_i = fuse(L_i, upsample(M_{i+1}))``; ``P_i = output_i(M_i)``;
    - extra pathways: :meth:`_extra_pathways` (none here; a subclass's, e.g. PAFPN's);
    - top block (optional): extra levels from a backbone feature or the last level.

    Output names are "p<stage>" with stride ``2**stage``, high to low resolution.
    """

    _upsample_mode: torch.jit.Final[str]
    _top_block_reads_backbone: torch.jit.Final[bool]
    # Per-level conv lists kept as plain Python lists (Detectron2's state-dict keys) and the
    # name prefix of their modules; __prepare_scriptable__ turns them into ModuleLists.
    _LEVEL_CONV_LISTS: Tuple[Tuple[str, str], ...] = (
        ("lateral_convs", "fpn_lateral"),
        ("output_convs", "fpn_output"),
    )

    @configurable
    def __init__(
        self,
        bottom_up: Backbone,
        in_features: List[str],
        out_channels: int,
        norm="",
        top_block=None,
        fuse_type: str = "sum",
        upsample_mode: str = "nearest",
        weighted_fusion_eps: float = 1e-4,
        square_pad: int = 0,
    ):
        """
        Args:
            bottom_up (Backbone): the bottom-up network; its outputs named in
                ``in_features`` feed the neck.
            in_features (list[str]): backbone features used, high to low resolution, each
                stride exactly twice the previous one (e.g. ["res2", "res3", "res4", "res5"]).
            out_channels (int): channels of every pyramid level.
            norm (str or callable): norm after the lateral and output convs (and a
                subclass's pathway convs); anything :func:`detectron2.layers.get_norm`
                accepts. Convs have a bias only without norm, as in Detectron2.
            top_block (str or nn.Module or None): extra levels: a name from
                :data:`~fpn_plugin.neck.top_blocks.TOP_BLOCKS`, None ("none"), or a module
                like Detectron2's ``LastLevelMaxPool``, with attributes ``num_levels`` and
                ``in_feature`` (a backbone feature or a pyramid level name).
            fuse_type (str): "sum" | "avg" ("mean") | "weighted" (fast normalized fusion
                with learnable non-negative weights).
            upsample_mode (str): "nearest" | "bilinear" top-down upsampling.
            weighted_fusion_eps (float): epsilon of "weighted" fusion, > 0.
            square_pad (int): if > 0, asks (Detectron2 main's ``padding_constraints``) for
                inputs padded to this square size; 0 as in Detectron2's FPN.

        Raises:
            ValueError: on any invalid argument; the message names the config key that
                sets it (``MODEL.FPN.*``) and the offending value.
        """
        super().__init__()
        input_shapes = bottom_up.output_shape()
        in_features = list(in_features)
        strides, in_channels = _check_in_features(in_features, input_shapes)
        fuse_type = _check_options(
            out_channels, norm, fuse_type, upsample_mode, weighted_fusion_eps, square_pad
        )
        stages = [int(math.log2(s)) for s in strides]
        level_names = [f"p{s}" for s in stages]
        # Detectron2's RetinaNet builder creates the P6/P7 convs before the FPN convs; keep
        # that order so a fresh build draws the same random numbers.
        top_block, reads_backbone = resolve_top_block(
            top_block, in_features, input_shapes, level_names, out_channels
        )

        spec = PathwaySpec(
            stages, in_channels, out_channels, norm, fuse_type, weighted_fusion_eps, upsample_mode
        )
        lateral_convs, output_convs, top_down_fusion = self._make_top_down(spec)
        # Top-down order (low to high resolution).
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.top_block = top_block
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up
        self.top_down_fusion = top_down_fusion
        self._make_extra_pathways(spec)
        # What a subclass builds its own modules from after this constructor (BiFPN's cells);
        # never read by forward, so TorchScript and tracing leave it alone.
        self._pathway_spec = spec

        self._record_output_shapes(level_names, strides, stages, out_channels)
        self._square_pad = square_pad
        self._upsample_mode = upsample_mode
        self._top_block_reads_backbone = reads_backbone

    @classmethod
    def from_config(cls, cfg, input_shape, *, bottom_up: Backbone):
        """
        Map ``cfg.MODEL.FPN`` to the constructor's arguments (the plugin's backbone builders
        in :mod:`fpn_plugin.neck.build` check first that the plugin's keys are there).

        Args:
            cfg (CfgNode): the config.
            input_shape (ShapeSpec): image input shape (unused: the bottom-up backbone is
                already built).
            bottom_up (Backbone): the bottom-up backbone.
        """
        fpn = cfg.MODEL.FPN
        return {
            "bottom_up": bottom_up,
            "in_features": list(fpn.IN_FEATURES),
            "out_channels": fpn.OUT_CHANNELS,
            "norm": fpn.NORM,
            "top_block": fpn.TOP_BLOCK,
            "fuse_type": fpn.FUSE_TYPE,
            "upsample_mode": fpn.UPSAMPLE_MODE,
            "weighted_fusion_eps": fpn.WEIGHTED_FUSION_EPS,
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # Detectron2 main reads this (v0.6 ignores it); same content as main's FPN.
        return {"square_size": self._square_pad}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x (Tensor): images `(N, C, H, W)`, H and W divisible by ``size_divisibility``
                (Detectron2's ``ImageList.from_tensors`` pads them so).

        Returns:
            dict[str, Tensor]: "p<stage>" -> `(N, out_channels, Hi, Wi)` with
            ``Hi = H / 2**stage``, high to low resolution (``self._out_features`` order).
        """
        bottom_up_features = self.bottom_up(x)
        results = self._extra_pathways(self._top_down(bottom_up_features))
        if self.top_block is not None:
            if self._top_block_reads_backbone:
                top_block_in_feature = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_in_feature = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_in_feature))
        assert len(self._out_features) == len(results)
        return {f: res for f, res in zip(self._out_features, results)}

    def _top_down(self, bottom_up_features: Dict[str, Tensor]) -> List[Tensor]:
        """
        Returns:
            list[Tensor]: P_i for the input levels, high to low resolution, each
            `(N, out_channels, Hi, Wi)`.
        """
        results: List[Tensor] = []
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results.append(self.output_convs[0](prev_features))
        if self.top_down_fusion is not None:
            for idx, (lateral_conv, output_conv) in enumerate(
                zip(self.lateral_convs, self.output_convs)
            ):
                # ModuleList slicing is not scriptable: loop over all, skip the coarsest level.
                if idx > 0:
                    features = bottom_up_features[self.in_features[-idx - 1]]
                    lateral_features = lateral_conv(features)
                    # Upsampling to the lateral's size equals Detectron2's scale_factor=2 on
                    # padded inputs, and still lines up when a caller feeds odd sizes.
                    top_down_features = resize_to(
                        prev_features, lateral_features.shape[-2:], self._upsample_mode
                    )
                    prev_features = self.top_down_fusion(
                        [lateral_features, top_down_features], idx - 1
                    )
                    results.insert(0, output_conv(prev_features))
        return results

    def _record_output_shapes(self, level_names: List[str], strides: List[int],
                              stages: List[int], out_channels: int) -> None:
        """The pyramid's level names, strides and channels (``output_shape``), the top block's
        levels included, and the size divisibility the merges need."""
        self._out_feature_strides = {name: s for name, s in zip(level_names, strides)}
        if self.top_block is not None:
            last = stages[-1]
            for s in range(last, last + self.top_block.num_levels):
                self._out_feature_strides[f"p{s + 1}"] = 2 ** (s + 1)
        self._out_features = list(self._out_feature_strides.keys())
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        # Every merge (top-down and any extra pathway) is between the input levels, so inputs
        # divisible by the coarsest input stride make all of them line up exactly.
        self._size_divisibility = strides[-1]

    def _add_level_convs(
        self, stages: List[int], make_convs, prefixes: Tuple[str, ...]
    ) -> Tuple[List[nn.Module], ...]:
        """
        Per level, the convs ``make_convs(level index)`` creates (one per prefix),
        Xavier-initialised after all of them exist and registered as ``{prefix}{stage}``
        (Detectron2's FPN order and names).

        Returns:
            One list of convs per prefix, high to low resolution: plain lists, not
            ModuleLists, so the state-dict keys stay ``{prefix}{stage}.*``
            (``__prepare_scriptable__`` turns them into ModuleLists for TorchScript).
        """
        lists: Tuple[List[nn.Module], ...] = tuple([] for _ in prefixes)
        for level, stage in enumerate(stages):
            convs = make_convs(level)
            for conv in convs:
                weight_init.c2_xavier_fill(conv)
            for prefix, conv, convs_of_prefix in zip(prefixes, convs, lists):
                self.add_module(f"{prefix}{stage}", conv)
                convs_of_prefix.append(conv)
        return lists

    def _make_top_down(
        self, spec: PathwaySpec
    ) -> Tuple[List[nn.Module], List[nn.Module], Optional[nn.Module]]:
        """
        Create the top-down pathway's modules (a subclass whose pathways replace it, e.g.
        BiFPN, creates only what it uses). The convs are registered here; the fusion module
        by ``__init__``, after the bottom-up backbone (Detectron2's parameter order).

        Args:
            spec (PathwaySpec): the levels and the neck's options.

        Returns:
            The lateral convs and the output convs (plain lists, high to low resolution), and
            the fusion of the merges (None when there is nothing to merge).
        """
        # Lateral/output convs exactly as Detectron2's FPN: names, bias rule, init, and the
        # creation order (the random-number order of a fresh build).
        lateral_convs, output_convs = self._add_level_convs(
            spec.stages,
            lambda level: (
                lateral_conv(spec.in_channels[level], spec.out_channels, spec.norm),
                conv3x3(spec.out_channels, spec.out_channels, spec.norm),
            ),
            ("fpn_lateral", "fpn_output"),
        )
        # One fusion node per merge; None where there is nothing to merge, which TorchScript
        # prunes (an unused weighted fusion would hold parameters that never get gradients).
        num_merges = len(spec.stages) - 1
        fusion = build_fusion(spec.fuse_type, num_merges, 2, spec.eps) if num_merges else None
        return lateral_convs, output_convs, fusion

    def _make_extra_pathways(self, spec: PathwaySpec) -> None:
        """
        Create the modules of the pathways after the top-down one (a subclass's hook; none
        here). Called by ``__init__`` once the top-down modules exist, so their random draws
        come first.

        Args:
            spec (PathwaySpec): the levels and the neck's options (``fuse_type`` for the
                pathway's merges).
        """

    def _extra_pathways(self, levels: List[Tensor]) -> List[Tensor]:
        """
        The pathways after the top-down one (a subclass's hook; none here).

        Args:
            levels (list[Tensor]): P_i of the input levels, high to low resolution.

        Returns:
            list[Tensor]: the levels that replace them, same shapes.
        """
        return levels

    def __prepare_scriptable__(self):
        """
        A copy for ``torch.jit.script`` with the per-level plain lists as ModuleLists, as
        Detectron2 does for its FPN (the copy's state-dict keys change accordingly).
        """
        ret = prepared_copy(self)
        for list_name, prefix in self._LEVEL_CONV_LISTS:
            setattr(ret, list_name, nn.ModuleList(getattr(ret, list_name)))
            for name in [n for n, _ in self.named_children() if n.startswith(prefix)]:
                delattr(ret, name)
        return ret


def lateral_conv(in_channels: int, out_channels: int, norm) -> Conv2d:
    """
    The 1x1 lateral conv of a level, as Detectron2's FPN builds it (bias only without norm):
    `(N, in_channels, H, W)` -> `(N, out_channels, H, W)`. Default init (the caller applies
    the neck's).
    """
    return Conv2d(
        in_channels, out_channels, kernel_size=1, bias=not norm, norm=get_norm(norm, out_channels)
    )


def _check_in_features(in_features, input_shapes):
    key = "MODEL.FPN.IN_FEATURES"
    if not in_features:
        raise ValueError(f"{key}={in_features!r}: the neck needs at least one backbone feature")
    for f in in_features:
        if f not in input_shapes:
            raise ValueError(
                f"{key}={in_features!r}: {f!r} is not produced by the bottom-up backbone, "
                f"which outputs {list(input_shapes)} "
                "(for ResNet, set by MODEL.RESNETS.OUT_FEATURES)"
            )
    strides = [input_shapes[f].stride for f in in_features]
    channels = [input_shapes[f].channels for f in in_features]
    for f, s, c in zip(in_features, strides, channels):
        if not isinstance(s, int) or s <= 0 or s & (s - 1):
            raise ValueError(
                f"{key}={in_features!r}: {f!r} has stride {s!r}, not a power of two"
            )
        if not isinstance(c, int) or c <= 0:
            raise ValueError(
                f"{key}={in_features!r}: the bottom-up backbone declares {c!r} channels for "
                f"{f!r}; the lateral conv needs a positive channel count"
            )
    for i in range(1, len(strides)):
        if strides[i] != 2 * strides[i - 1]:
            raise ValueError(
                f"{key}={in_features!r} have strides {strides}: each feature's stride must be "
                f"exactly twice the previous one (high to low resolution), but "
                f"{in_features[i]!r} has {strides[i]} after {in_features[i - 1]!r} with "
                f"{strides[i - 1]}"
            )
    return strides, channels


def _check_options(out_channels, norm, fuse_type, upsample_mode, eps, square_pad) -> str:
    """Validate the neck's scalar options; returns the canonical fusion word."""
    if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels <= 0:
        raise ValueError(f"MODEL.FPN.OUT_CHANNELS={out_channels!r} must be a positive int")
    try:
        get_norm(norm, out_channels)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"MODEL.FPN.NORM={norm!r} with MODEL.FPN.OUT_CHANNELS={out_channels}: not accepted "
            f"by detectron2.layers.get_norm ({type(e).__name__}: {e}); use one of '', 'BN', "
            "'SyncBN', 'FrozenBN', 'GN' (OUT_CHANNELS divisible by 32)"
        ) from e
    fuse_type = check_fuse_type(fuse_type, NECK_FUSE_TYPES, "MODEL.FPN.FUSE_TYPE")
    if upsample_mode not in INTERPOLATION_MODES:
        raise ValueError(
            f"MODEL.FPN.UPSAMPLE_MODE={upsample_mode!r} is not one of {list(INTERPOLATION_MODES)}"
        )
    # Checked whatever FUSE_TYPE is, so a bad value never waits for a later switch.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"MODEL.FPN.WEIGHTED_FUSION_EPS={eps!r} must be a number > 0")
    if not isinstance(square_pad, int) or isinstance(square_pad, bool) or square_pad < 0:
        raise ValueError(f"square_pad must be an int >= 0, got {square_pad!r}")
    return fuse_type
