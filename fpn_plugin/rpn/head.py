"""
``PerLevelRPNHead``: the RPN head run on every pyramid level, with per-level control.

Shape shorthand: N images; L levels; Ci channels and Ai anchors per position on level i;
Hi, Wi its size; B the box dimension (4).
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from torch import nn

from ..utils.registry import register
from .config import check_anchor_params, check_conv_dims

__all__ = ["PerLevelRPNHead"]


class _AnchorPredictor(nn.Module):
    """The two 1x1 convs: objectness logits (A channels) and box deltas (A*B channels)."""

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int):
        super().__init__()
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.objectness_logits(x), self.anchor_deltas(x)


def _as_per_level(value: Union[int, Sequence[int]], num_levels: int, name: str) -> List[int]:
    if isinstance(value, int):
        return [value] * num_levels
    value = list(value)
    if len(value) != num_levels:
        raise ValueError(f"{name} has {len(value)} entries, expected one per level ({num_levels})")
    return value


@register(RPN_HEAD_REGISTRY)
class PerLevelRPNHead(nn.Module):
    """
    RPN head for feature pyramids: 3x3 convs (``conv_dims``, optional norm) then two 1x1
    predictors, applied to each level on its own.

    * ``shared=True`` (default, the FPN paper): one set of weights for every level. When all
      levels have the same number of anchors this is Detectron2's ``StandardRPNHead``, with
      the same parameter names (its checkpoints load unchanged) and the same initialisation.
      When anchor counts differ, the convs stay shared and the 1x1 predictors are shared by
      the levels with the same count (one predictor pair per distinct count), which is what
      Detectron2 does already for levels whose aspect-ratio sets differ but have equal size.
    * ``shared=False``: every level has its own convs and predictors (channels may differ).

    Parameter layout: shared convs ``conv`` (a Conv2d, or ``conv.conv{k}`` for several), shared
    predictors ``objectness_logits`` / ``anchor_deltas``; per-level convs ``level_convs.{i}``;
    grouped or per-level predictors ``predictors.{g}.objectness_logits`` / ``.anchor_deltas``.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: Union[int, Sequence[int]],
        num_anchors: Union[int, Sequence[int]],
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1,),
        shared: bool = True,
        norm: str = "",
        num_levels: int = 0,
    ):
        """
        Args:
            in_channels (int or list[int]): channels of the input features, per level or one
                for all. A shared head needs equal channels on every level.
            num_anchors (int or list[int]): anchors per spatial position, per level or one
                for all (the length of the anchor generator's ``num_anchors``).
            box_dim (int): box parameters predicted per anchor (4 for axis-aligned boxes).
            conv_dims (list[int]): output channels of each 3x3 conv (-1 = its input
                channels); the list's length is the number of convs, possibly 0.
            shared (bool): one head for all levels (True) or a head per level (False).
            norm (str): normalization after each 3x3 conv ("" = none), see ``get_norm``.
            num_levels (int): number of levels; needed only when both ``in_channels`` and
                ``num_anchors`` are ints and the head is not shared.
        """
        super().__init__()
        if num_levels <= 0:
            lists = [len(v) for v in (in_channels, num_anchors) if not isinstance(v, int)]
            num_levels = lists[0] if lists else 0
        if num_levels <= 0 and not shared:
            raise ValueError("PerLevelRPNHead(shared=False) needs per-level lists or num_levels")
        conv_dims = check_conv_dims(conv_dims)
        channels = _as_per_level(in_channels, max(num_levels, 1), "in_channels")
        anchors = _as_per_level(num_anchors, max(num_levels, 1), "num_anchors")
        if shared and len(set(channels)) != 1:
            raise ValueError(
                f"a shared RPN head needs equal channels on all levels, got {channels}"
            )

        # None attributes are compile-time constants for TorchScript, so forward() only
        # compiles the branch that this layout uses.
        self.conv = None
        self.level_convs = None
        self.objectness_logits = None
        self.anchor_deltas = None
        self.predictors = None
        self.predictor_levels: List[List[int]] = []
        # 0 when any number of levels is accepted (the StandardRPNHead case).
        self.num_levels = 0

        if shared:
            # Creation order conv -> objectness_logits -> anchor_deltas, as in StandardRPNHead,
            # so the same seed gives the same initial weights.
            self.conv, hidden = self._make_convs(channels[0], conv_dims, norm)
            if len(set(anchors)) == 1:
                self.objectness_logits = nn.Conv2d(hidden, anchors[0], kernel_size=1)
                self.anchor_deltas = nn.Conv2d(hidden, anchors[0] * box_dim, kernel_size=1)
            else:
                distinct = list(dict.fromkeys(anchors))  # first-appearance order
                self.predictors = nn.ModuleList(
                    [_AnchorPredictor(hidden, a, box_dim) for a in distinct]
                )
                self.predictor_levels = [
                    [i for i, a in enumerate(anchors) if a == count] for count in distinct
                ]
                self.num_levels = num_levels
        else:
            convs, hiddens = [], []
            for c in channels:
                conv, hidden = self._make_convs(c, conv_dims, norm)
                convs.append(conv)
                hiddens.append(hidden)
            self.level_convs = nn.ModuleList(convs)
            self.predictors = nn.ModuleList(
                [_AnchorPredictor(h, a, box_dim) for h, a in zip(hiddens, anchors)]
            )
            self.predictor_levels = [[i] for i in range(num_levels)]
            self.num_levels = num_levels

        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)

    @staticmethod
    def _make_convs(in_channels: int, conv_dims: List[int], norm: str) -> Tuple[nn.Module, int]:
        """3x3 conv(s) + ReLU; one conv is a bare Conv2d (StandardRPNHead's checkpoint names)."""

        def conv3x3(cin: int, cout: int) -> nn.Module:
            return Conv2d(
                cin,
                cout,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, cout),
                activation=nn.ReLU(),
            )

        if len(conv_dims) == 1:
            out = in_channels if conv_dims[0] == -1 else conv_dims[0]
            return conv3x3(in_channels, out), out
        convs = nn.Sequential()
        cur = in_channels
        for k, dim in enumerate(conv_dims):
            out = cur if dim == -1 else dim
            convs.add_module(f"conv{k}", conv3x3(cur, out))
            cur = out
        return convs, cur

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        in_features = list(cfg.MODEL.RPN.IN_FEATURES)
        num_levels = len(input_shape)
        shared = cfg.MODEL.RPN.SHARED_HEAD
        if not isinstance(shared, bool):
            raise ValueError(f"MODEL.RPN.SHARED_HEAD must be True or False, got {shared!r}")
        channels = [s.channels for s in input_shape]
        if shared and len(set(channels)) != 1:
            raise ValueError(
                f"MODEL.RPN.SHARED_HEAD=True shares one head across MODEL.RPN.IN_FEATURES "
                f"{in_features}, whose channels differ: {channels}; set MODEL.RPN.SHARED_HEAD: "
                "False for a head per level"
            )
        norm = cfg.MODEL.RPN.HEAD_NORM
        try:
            get_norm(norm, 32 * max(channels))  # a channel count every norm accepts
        except Exception as e:
            raise ValueError(f"MODEL.RPN.HEAD_NORM = {norm!r} is not a known norm: {e}") from e
        conv_dims = check_conv_dims(cfg.MODEL.RPN.CONV_DIMS)
        if norm == "GN":
            hidden = []
            for cur in sorted(set(channels)):
                for d in conv_dims:
                    cur = cur if d == -1 else d
                    hidden.append(cur)
            if any(h % 32 for h in hidden):
                raise ValueError(
                    f"MODEL.RPN.HEAD_NORM = 'GN' uses 32 groups; conv channels {hidden} "
                    "(MODEL.RPN.CONV_DIMS / input channels) must be multiples of 32"
                )
        check_anchor_params(
            cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            num_levels,
            in_features,
        )
        # The head predicts what the anchor generator lays out (building one has no side
        # effects; StandardRPNHead does the same).
        anchor_generator = build_anchor_generator(cfg, input_shape)
        return {
            "in_channels": channels,
            "num_anchors": list(anchor_generator.num_anchors),
            "box_dim": anchor_generator.box_dim,
            "conv_dims": conv_dims,
            "shared": shared,
            "norm": norm,
            "num_levels": num_levels,
        }

    def forward(
        self, features: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features (list[Tensor]): L feature maps, level i of shape (N, Ci, Hi, Wi).

        Returns:
            list[Tensor]: L tensors, level i (N, Ai, Hi, Wi): objectness logits.
            list[Tensor]: L tensors, level i (N, Ai*B, Hi, Wi): anchor deltas.
        """
        if self.num_levels > 0 and len(features) != self.num_levels:
            raise ValueError(
                f"PerLevelRPNHead was built for {self.num_levels} levels, got {len(features)}"
            )
        hidden: List[torch.Tensor] = []
        if self.conv is not None:
            hidden = [self.conv(x) for x in features]
        if self.level_convs is not None:
            for i, conv in enumerate(self.level_convs):
                hidden.append(conv(features[i]))

        if self.objectness_logits is not None and self.anchor_deltas is not None:
            logits = [self.objectness_logits(t) for t in hidden]
            deltas = [self.anchor_deltas(t) for t in hidden]
            return logits, deltas

        by_level_logits: Dict[int, torch.Tensor] = {}
        by_level_deltas: Dict[int, torch.Tensor] = {}
        if self.predictors is not None:
            for g, predictor in enumerate(self.predictors):
                for level in self.predictor_levels[g]:
                    logit, delta = predictor(hidden[level])
                    by_level_logits[level] = logit
                    by_level_deltas[level] = delta
        logits = [by_level_logits[i] for i in range(len(hidden))]
        deltas = [by_level_deltas[i] for i in range(len(hidden))]
        return logits, deltas
