"""
``CustomFPN``: the feature-pyramid neck on top of a bottom-up backbone, one implementation
whose switches give Detectron2's FPN (the defaults) and its variants: fusion type,
upsampling mode, PANet bottom-up path augmentation, top block and normalization.

Parity contract (all defaults): same parameter names as Detectron2's ``FPN``
(``fpn_lateral{stage}``, ``fpn_output{stage}``, ``top_block.*``, ``bottom_up.*``), the same
initialisation in the same random-number order, and the same forward computation, so
Detectron2 FPN checkpoints load strictly and give identical pyramids. Variants only add
parameters when enabled (``top_down_fusion.weight``, ``pan_fusion.weight``,
``pan_downsample{stage}.*``, ``pan_output{stage}.*``).
"""
import copy
import math
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

from .fusion import FUSE_TYPES, build_fusion
from .top_blocks import TOP_BLOCKS, build_top_block

__all__ = ["CustomFPN", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("nearest", "bilinear")

# Builders that put this neck on the backbone named by MODEL.FPN.BOTTOM_UP_BACKBONE, so they
# cannot be that backbone themselves (endless recursion).
_SELF_REFERENTIAL_BUILDERS = ("build_custom_fpn_backbone",)


class CustomFPN(Backbone):
    """
    Feature pyramid (:paper:`FPN`) built on the features of a bottom-up backbone, with
    optional PANet bottom-up path augmentation and EfficientDet-style weighted fusion.

    For input features C_i (strides 2**i, high to low resolution):

    - top-down: ``L_i = lateral_i(C_i)``; ``M_last = L_last``;
      ``M_i = fuse(L_i, upsample(M_{i+1}))``; ``P_i = output_i(M_i)``;
    - bottom-up path (optional): ``N_first = P_first``;
      ``N_i = pan_output_i(fuse(P_i, pan_downsample_i(N_{i-1})))``, replacing P_i;
    - top block (optional): extra levels from a backbone feature or the last level.

    Output names are "p<stage>" with stride ``2**stage``, high to low resolution.
    """

    _fuse_type: torch.jit.Final[str]
    _upsample_mode: torch.jit.Final[str]
    _top_block_reads_backbone: torch.jit.Final[bool]

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
        bottom_up_path: bool = False,
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
            norm (str or callable): norm after the lateral, output (and bottom-up path)
                convs; anything :func:`detectron2.layers.get_norm` accepts. Convs have a bias
                only without norm, as in Detectron2.
            top_block (str or nn.Module or None): extra levels: a name from
                :data:`~fpn_plugin.neck.top_blocks.TOP_BLOCKS`, None ("none"), or a module
                like Detectron2's ``LastLevelMaxPool``, with attributes ``num_levels`` and
                ``in_feature`` (a backbone feature or a pyramid level name).
            fuse_type (str): "sum" | "avg" | "weighted" (fast normalized fusion with
                learnable non-negative weights).
            upsample_mode (str): "nearest" | "bilinear" top-down upsampling.
            bottom_up_path (bool): add PANet's bottom-up path augmentation.
            weighted_fusion_eps (float): epsilon of "weighted" fusion, > 0.
            square_pad (int): if > 0, asks (Detectron2 main's ``padding_constraints``) for
                inputs padded to this square size; 0 as in Detectron2's FPN.

        Raises:
            ValueError: on any invalid argument; the message names the config key that
                sets it (``MODEL.FPN.*``) and the offending value.
        """
        super().__init__()
        if not isinstance(bottom_up, Backbone):
            raise ValueError(
                "bottom_up (built from MODEL.FPN.BOTTOM_UP_BACKBONE) must be a detectron2 "
                f"Backbone, got {type(bottom_up).__name__}"
            )
        input_shapes = bottom_up.output_shape()
        in_features = list(in_features)
        strides, in_channels_per_feature = _check_in_features(in_features, input_shapes)
        _check_options(
            out_channels, norm, fuse_type, upsample_mode, bottom_up_path, weighted_fusion_eps
        )
        if not isinstance(square_pad, int) or isinstance(square_pad, bool) or square_pad < 0:
            raise ValueError(f"square_pad must be an int >= 0, got {square_pad!r}")

        stages = [int(math.log2(s)) for s in strides]
        level_names = [f"p{s}" for s in stages]
        # Detectron2's RetinaNet builder creates the P6/P7 convs before the FPN convs; keep
        # that order so a fresh build draws the same random numbers.
        if isinstance(top_block, str):
            if top_block not in TOP_BLOCKS:
                raise ValueError(
                    f"MODEL.FPN.TOP_BLOCK={top_block!r} is not one of {list(TOP_BLOCKS)}"
                )
            # A named block knows its source, even if the backbone also has a "p5" output
            # (e.g. an FPN used as bottom-up backbone).
            reads_backbone = top_block == "p6p7_res5"
            top_block = build_top_block(
                top_block, in_features[-1], in_channels_per_feature[-1], level_names[-1],
                out_channels,
            )
        else:
            # Detectron2's rule for a given module: a backbone feature of that name wins.
            reads_backbone = getattr(top_block, "in_feature", None) in input_shapes
        if top_block is not None:
            _check_top_block(top_block, input_shapes, level_names, out_channels, reads_backbone)

        # Lateral/output convs exactly as Detectron2's FPN: names, bias rule, init, and the
        # creation order (the random-number order of a fresh build).
        lateral_convs = []
        output_convs = []
        use_bias = norm == ""
        for in_channels, stage in zip(in_channels_per_feature, stages):
            lateral_conv = Conv2d(
                in_channels, out_channels, kernel_size=1, bias=use_bias,
                norm=get_norm(norm, out_channels),
            )
            output_conv = Conv2d(
                out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=use_bias,
                norm=get_norm(norm, out_channels),
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"fpn_lateral{stage}", lateral_conv)
            self.add_module(f"fpn_output{stage}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Plain lists (not ModuleList) keep Detectron2's state-dict keys; top-down order
        # (low to high resolution). `__prepare_scriptable__` turns them into ModuleLists.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.top_block = top_block
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up

        num_levels = len(in_features)
        # One fusion node per merge; None where there is nothing to merge, which TorchScript
        # prunes (an unused weighted fusion would hold parameters that never get gradients).
        self.top_down_fusion = (
            build_fusion(fuse_type, num_levels - 1, 2, weighted_fusion_eps)
            if num_levels > 1 else None
        )
        pan_downsample_convs = []
        pan_output_convs = []
        if bottom_up_path:
            for stage in stages[1:]:
                down = Conv2d(
                    out_channels, out_channels, kernel_size=3, stride=2, padding=1,
                    bias=use_bias, norm=get_norm(norm, out_channels),
                )
                out = Conv2d(
                    out_channels, out_channels, kernel_size=3, stride=1, padding=1,
                    bias=use_bias, norm=get_norm(norm, out_channels),
                )
                weight_init.c2_xavier_fill(down)
                weight_init.c2_xavier_fill(out)
                self.add_module(f"pan_downsample{stage}", down)
                self.add_module(f"pan_output{stage}", out)
                pan_downsample_convs.append(down)
                pan_output_convs.append(out)
        # High to low resolution (the bottom-up direction).
        self.pan_downsample_convs = pan_downsample_convs
        self.pan_output_convs = pan_output_convs
        self.pan_fusion = (
            build_fusion(fuse_type, num_levels - 1, 2, weighted_fusion_eps)
            if bottom_up_path and num_levels > 1 else None
        )

        self._out_feature_strides = {name: s for name, s in zip(level_names, strides)}
        if self.top_block is not None:
            last = stages[-1]
            for s in range(last, last + self.top_block.num_levels):
                self._out_feature_strides[f"p{s + 1}"] = 2 ** (s + 1)
        self._out_features = list(self._out_feature_strides.keys())
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        # Every merge (top-down and bottom-up path) is between the input levels, so inputs
        # divisible by the coarsest input stride make all of them line up exactly.
        self._size_divisibility = strides[-1]
        self._square_pad = square_pad
        self._fuse_type = fuse_type
        self._upsample_mode = upsample_mode
        self._top_block_reads_backbone = reads_backbone

    @classmethod
    def from_config(cls, cfg, input_shape, bottom_up=None):
        """
        Read ``cfg.MODEL.FPN`` (needs ``fpn_plugin.add_fpn_plugin_config``).

        Args:
            cfg (CfgNode): the config.
            input_shape (ShapeSpec): image input shape, passed to the bottom-up builder.
            bottom_up (Backbone or None): the bottom-up backbone; None builds the one
                named by ``MODEL.FPN.BOTTOM_UP_BACKBONE``.
        """
        fpn = cfg.MODEL.FPN
        if "TOP_BLOCK" not in fpn:
            raise ValueError(
                "cfg.MODEL.FPN has no TOP_BLOCK key: call fpn_plugin.add_fpn_plugin_config(cfg) "
                "before merging the config file"
            )
        if bottom_up is None:
            bottom_up = _build_bottom_up(cfg, input_shape)
        return {
            "bottom_up": bottom_up,
            "in_features": list(fpn.IN_FEATURES),
            "out_channels": fpn.OUT_CHANNELS,
            "norm": fpn.NORM,
            "top_block": fpn.TOP_BLOCK,
            "fuse_type": fpn.FUSE_TYPE,
            "upsample_mode": fpn.UPSAMPLE_MODE,
            "bottom_up_path": fpn.BOTTOM_UP_PATH,
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
                    top_down_features = self._upsample(prev_features, lateral_features)
                    prev_features = self.top_down_fusion(
                        [lateral_features, top_down_features], idx - 1
                    )
                    results.insert(0, output_conv(prev_features))

        if self.pan_fusion is not None:
            prev_features = results[0]
            augmented = [prev_features]
            for idx, (down_conv, out_conv) in enumerate(
                zip(self.pan_downsample_convs, self.pan_output_convs)
            ):
                fused = self.pan_fusion([results[idx + 1], down_conv(prev_features)], idx)
                prev_features = out_conv(fused)
                augmented.append(prev_features)
            results = augmented

        if self.top_block is not None:
            if self._top_block_reads_backbone:
                top_block_in_feature = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_in_feature = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_in_feature))
        assert len(self._out_features) == len(results)
        return {f: res for f, res in zip(self._out_features, results)}

    def _upsample(self, x: Tensor, like: Tensor) -> Tensor:
        # Upsampling to the lateral's size equals Detectron2's scale_factor=2 on padded
        # inputs, and still lines up when a caller feeds unpadded odd sizes.
        size = like.shape[-2:]
        if self._upsample_mode == "bilinear":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.interpolate(x, size=size, mode="nearest")

    def __prepare_scriptable__(self):
        """
        A copy for ``torch.jit.script`` with the per-level plain lists as ModuleLists, as
        Detectron2 does for its FPN (the copy's state-dict keys change accordingly).
        """
        ret = copy.deepcopy(self)
        per_level = ("fpn_lateral", "fpn_output", "pan_downsample", "pan_output")
        level_module_names = [n for n, _ in self.named_children() if n.startswith(per_level)]
        ret.lateral_convs = nn.ModuleList(ret.lateral_convs)
        ret.output_convs = nn.ModuleList(ret.output_convs)
        ret.pan_downsample_convs = nn.ModuleList(ret.pan_downsample_convs)
        ret.pan_output_convs = nn.ModuleList(ret.pan_output_convs)
        for name in level_module_names:
            delattr(ret, name)
        return ret


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


def _check_options(out_channels, norm, fuse_type, upsample_mode, bottom_up_path, eps):
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
    if fuse_type not in FUSE_TYPES:
        raise ValueError(f"MODEL.FPN.FUSE_TYPE={fuse_type!r} is not one of {list(FUSE_TYPES)}")
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(
            f"MODEL.FPN.UPSAMPLE_MODE={upsample_mode!r} is not one of {list(UPSAMPLE_MODES)}"
        )
    if not isinstance(bottom_up_path, bool):
        raise ValueError(f"MODEL.FPN.BOTTOM_UP_PATH={bottom_up_path!r} must be True or False")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"MODEL.FPN.WEIGHTED_FUSION_EPS={eps!r} must be a number > 0")


def _check_top_block(top_block, input_shapes, level_names, out_channels, reads_backbone):
    num_levels = getattr(top_block, "num_levels", None)
    in_feature = getattr(top_block, "in_feature", None)
    if not isinstance(num_levels, int) or num_levels < 1 or not isinstance(in_feature, str):
        raise ValueError(
            f"top_block {type(top_block).__name__} needs an int attribute num_levels >= 1 and "
            f"a str attribute in_feature; got num_levels={num_levels!r}, in_feature={in_feature!r}"
        )
    if reads_backbone:
        channels = input_shapes[in_feature].channels
    elif in_feature in level_names:
        channels = out_channels
    else:
        raise ValueError(
            f"top_block.in_feature={in_feature!r} is neither a bottom-up feature "
            f"{list(input_shapes)} nor a pyramid level {level_names}"
        )
    # Detectron2-style P6/P7 blocks: their first conv must take the input's channels.
    first_conv = getattr(top_block, "p6", None)
    if isinstance(first_conv, nn.Conv2d) and first_conv.in_channels != channels:
        raise ValueError(
            f"top_block.p6 takes {first_conv.in_channels} channels but its input "
            f"{in_feature!r} has {channels} (MODEL.FPN.OUT_CHANNELS or the backbone's channels)"
        )


def _build_bottom_up(cfg, input_shape):
    key = "MODEL.FPN.BOTTOM_UP_BACKBONE"
    name = cfg.MODEL.FPN.BOTTOM_UP_BACKBONE
    if name in _SELF_REFERENTIAL_BUILDERS:
        raise ValueError(f"{key}={name!r}: the neck cannot be its own bottom-up backbone")
    try:
        builder = BACKBONE_REGISTRY.get(name)
    except KeyError:
        raise ValueError(
            f"{key}={name!r} is not registered in BACKBONE_REGISTRY "
            f"(registered: {sorted(n for n, _ in BACKBONE_REGISTRY)})"
        ) from None
    bottom_up = builder(cfg, input_shape)
    if not isinstance(bottom_up, Backbone):
        raise ValueError(
            f"{key}={name!r} returned a {type(bottom_up).__name__}, not a detectron2 Backbone"
        )
    return bottom_up
