"""
RPN heads for feature pyramids, one small class per layout, and ``PerLevelRPNHead``, the name
registered in ``RPN_HEAD_REGISTRY`` that picks the layout from the config:

- :class:`SharedRPNHead`: one set of weights for every level; Detectron2's
  ``StandardRPNHead`` (same parameter names, same initialisation);
- :class:`SharedConvGroupedRPNHead`: shared 3x3 convs, and one predictor pair per distinct
  anchor count, used by the levels with that count (levels may differ in anchor count);
- :class:`UnsharedRPNHead`: every level its own convs and predictors (channels may differ).

Shape shorthand: N images; L levels; Ci channels and Ai anchors per position on level i;
Hi, Wi its size; B the box dimension (4).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from torch import nn

from ..layers import conv3x3
from ..utils.config import require_plugin_keys
from ..utils.registry import register
from .config import add_rpn_config, anchor_generator_from_config, per_level_ints

__all__ = [
    "PerLevelRPNHead",
    "SharedRPNHead",
    "SharedConvGroupedRPNHead",
    "UnsharedRPNHead",
    "AnchorPredictor",
]

Logits = Tuple[List[torch.Tensor], List[torch.Tensor]]


class AnchorPredictor(nn.Module):
    """The two 1x1 convs: objectness logits (A channels) and box deltas (A*B channels)."""

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int):
        super().__init__()
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(N, C, H, W)` -> `(N, A, H, W)` logits, `(N, A*B, H, W)` deltas."""
        return self.objectness_logits(x), self.anchor_deltas(x)


def _check_convs(in_channels: Sequence[int], conv_dims: Sequence[int], norm: str) -> List[int]:
    """The 3x3 convs' arguments, checked once for every layout; returns ``conv_dims`` as a list."""
    dims = list(conv_dims)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or (d != -1 and d <= 0):
            raise ValueError(f"MODEL.RPN.CONV_DIMS entries must be -1 or > 0, got {dims}")
    try:
        get_norm(norm, 32 * max(in_channels))  # a channel count every norm accepts
    except Exception as e:
        raise ValueError(f"MODEL.RPN.HEAD_NORM = {norm!r} is not a known norm: {e}") from e
    if norm == "GN":
        hidden = []
        for cur in sorted(set(in_channels)):
            for d in dims:
                cur = cur if d == -1 else d
                hidden.append(cur)
        if any(h % 32 for h in hidden):
            raise ValueError(
                f"MODEL.RPN.HEAD_NORM = 'GN' uses 32 groups; conv channels {hidden} "
                "(MODEL.RPN.CONV_DIMS / input channels) must be multiples of 32"
            )
    return dims


def _rpn_convs(in_channels: int, conv_dims: List[int], norm: str) -> Tuple[nn.Module, int]:
    """3x3 conv(s) + ReLU; one conv is a bare Conv2d (StandardRPNHead's checkpoint names)."""
    if len(conv_dims) == 1:
        out = in_channels if conv_dims[0] == -1 else conv_dims[0]
        return conv3x3(in_channels, out, norm, relu=True), out
    convs = nn.Sequential()
    cur = in_channels
    for k, dim in enumerate(conv_dims):
        out = cur if dim == -1 else dim
        convs.add_module(f"conv{k}", conv3x3(cur, out, norm, relu=True))
        cur = out
    return convs, cur


def _init_weights_(head: nn.Module) -> None:
    # StandardRPNHead's init, over all convs in creation order (the random-number order).
    for layer in head.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0)


class SharedRPNHead(nn.Module):
    """
    One head for every level: 3x3 convs (``conv``: a Conv2d, or ``conv.conv{k}`` for
    several) and the 1x1 predictors ``objectness_logits`` / ``anchor_deltas``. Detectron2's
    ``StandardRPNHead``: same parameter names, initialisation and outputs.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1,),
        norm: str = "",
    ):
        """
        Args:
            in_channels (int): channels of every level's features.
            num_anchors (int): anchors per spatial position, on every level.
            box_dim (int): box parameters predicted per anchor (4 for axis-aligned boxes).
            conv_dims (list[int]): output channels of each 3x3 conv (-1 = its input
                channels); the list's length is the number of convs, possibly 0.
            norm (str): normalization after each 3x3 conv ("" = none), see ``get_norm``.
        """
        super().__init__()
        conv_dims = _check_convs([in_channels], conv_dims, norm)
        # Creation order conv -> objectness_logits -> anchor_deltas, as in StandardRPNHead,
        # so the same seed gives the same initial weights.
        self.conv, hidden = _rpn_convs(in_channels, conv_dims, norm)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * box_dim, kernel_size=1)
        _init_weights_(self)

    def forward(self, features: List[torch.Tensor]) -> Logits:
        """
        Args:
            features (list[Tensor]): L feature maps, level i of shape (N, C, Hi, Wi).

        Returns:
            list[Tensor]: L tensors, level i (N, A, Hi, Wi): objectness logits.
            list[Tensor]: L tensors, level i (N, A*B, Hi, Wi): anchor deltas.
        """
        hidden = [self.conv(x) for x in features]
        return (
            [self.objectness_logits(t) for t in hidden],
            [self.anchor_deltas(t) for t in hidden],
        )


class SharedConvGroupedRPNHead(nn.Module):
    """
    Shared 3x3 convs (``conv``, as :class:`SharedRPNHead`) and one predictor pair per
    distinct anchor count (``predictors.{g}.objectness_logits`` / ``.anchor_deltas``), used
    by the levels with that count: what Detectron2 already does for levels whose aspect-ratio
    sets differ but have equal size, extended to different sizes.
    """

    num_levels: torch.jit.Final[int]

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: Sequence[int],
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1,),
        norm: str = "",
    ):
        """
        Args:
            in_channels (int): channels of every level's features.
            num_anchors (list[int]): anchors per spatial position, one entry per level.
            box_dim, conv_dims, norm: as :class:`SharedRPNHead`.
        """
        super().__init__()
        conv_dims = _check_convs([in_channels], conv_dims, norm)
        anchors = list(num_anchors)
        self.conv, hidden = _rpn_convs(in_channels, conv_dims, norm)
        distinct = list(dict.fromkeys(anchors))  # first-appearance order
        self.predictors = nn.ModuleList([AnchorPredictor(hidden, a, box_dim) for a in distinct])
        self.predictor_levels: List[List[int]] = [
            [i for i, a in enumerate(anchors) if a == count] for count in distinct
        ]
        self.num_levels = len(anchors)
        _init_weights_(self)

    def forward(self, features: List[torch.Tensor]) -> Logits:
        """As :meth:`UnsharedRPNHead.forward` (levels of equal channels)."""
        _check_num_levels(len(features), self.num_levels)
        hidden = [self.conv(x) for x in features]
        by_level_logits: Dict[int, torch.Tensor] = {}
        by_level_deltas: Dict[int, torch.Tensor] = {}
        for g, predictor in enumerate(self.predictors):
            for level in self.predictor_levels[g]:
                logit, delta = predictor(hidden[level])
                by_level_logits[level] = logit
                by_level_deltas[level] = delta
        logits = [by_level_logits[i] for i in range(len(hidden))]
        deltas = [by_level_deltas[i] for i in range(len(hidden))]
        return logits, deltas


class UnsharedRPNHead(nn.Module):
    """
    A head per level: ``level_convs.{i}`` (3x3 convs, as :class:`SharedRPNHead`'s ``conv``)
    and ``predictors.{i}.objectness_logits`` / ``.anchor_deltas``; levels may differ in
    channels and anchor count.
    """

    num_levels: torch.jit.Final[int]

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1,),
        norm: str = "",
    ):
        """
        Args:
            in_channels (list[int]): channels of the features, one entry per level.
            num_anchors (list[int]): anchors per spatial position, one entry per level.
            box_dim, conv_dims, norm: as :class:`SharedRPNHead`.
        """
        super().__init__()
        channels = list(in_channels)
        if len(channels) != len(num_anchors):
            raise ValueError(
                f"in_channels {channels} and num_anchors {list(num_anchors)} need one entry "
                "per level (MODEL.RPN.IN_FEATURES) each"
            )
        conv_dims = _check_convs(channels, conv_dims, norm)
        # All levels' convs first, then the predictors: the creation (random-number) order.
        convs, hiddens = [], []
        for c in channels:
            conv, hidden = _rpn_convs(c, conv_dims, norm)
            convs.append(conv)
            hiddens.append(hidden)
        self.level_convs = nn.ModuleList(convs)
        self.predictors = nn.ModuleList(
            [AnchorPredictor(h, a, box_dim) for h, a in zip(hiddens, num_anchors)]
        )
        self.num_levels = len(channels)
        _init_weights_(self)

    def forward(self, features: List[torch.Tensor]) -> Logits:
        """
        Args:
            features (list[Tensor]): ``num_levels`` maps, level i of shape (N, Ci, Hi, Wi).

        Returns:
            list[Tensor]: L tensors, level i (N, Ai, Hi, Wi): objectness logits.
            list[Tensor]: L tensors, level i (N, Ai*B, Hi, Wi): anchor deltas.
        """
        _check_num_levels(len(features), self.num_levels)
        logits: List[torch.Tensor] = []
        deltas: List[torch.Tensor] = []
        for i, (conv, predictor) in enumerate(zip(self.level_convs, self.predictors)):
            logit, delta = predictor(conv(features[i]))
            logits.append(logit)
            deltas.append(delta)
        return logits, deltas


def _check_num_levels(got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(
            "PerLevelRPNHead was built for " + str(expected) + " levels, got " + str(got)
        )


def _head_args_from_config(cfg, input_shape: List[ShapeSpec]):
    require_plugin_keys(cfg, add_rpn_config, "PerLevelRPNHead (MODEL.RPN)")
    # The head predicts what the anchor generator lays out (building one has no side
    # effects; StandardRPNHead does the same).
    anchor_generator = anchor_generator_from_config(cfg, input_shape)
    rpn = cfg.MODEL.RPN
    return {
        "in_channels": [s.channels for s in input_shape],
        "num_anchors": list(anchor_generator.num_anchors),
        "box_dim": anchor_generator.box_dim,
        "conv_dims": list(rpn.CONV_DIMS),
        "shared": rpn.SHARED_HEAD,
        "norm": rpn.HEAD_NORM,
    }


@register(RPN_HEAD_REGISTRY)
@configurable(from_config=_head_args_from_config)
def PerLevelRPNHead(  # the registered name: a factory called like a class
    *,
    in_channels: Union[int, Sequence[int]],
    num_anchors: Union[int, Sequence[int]],
    box_dim: int = 4,
    conv_dims: Sequence[int] = (-1,),
    shared: bool = True,
    norm: str = "",
    num_levels: Optional[int] = None,
) -> nn.Module:
    """
    The RPN head for a feature pyramid, in the layout the arguments ask for:

    * ``shared=True`` (default, the FPN paper): one set of weights for every level. With the
      same anchor count on all levels this is Detectron2's ``StandardRPNHead``
      (:class:`SharedRPNHead`); with different counts the convs stay shared and the levels
      with the same count share a predictor pair (:class:`SharedConvGroupedRPNHead`).
    * ``shared=False``: every level has its own convs and predictors
      (:class:`UnsharedRPNHead`; channels may differ).

    Args:
        in_channels (int or list[int]): channels of the input features, per level or one for
            all. A shared head needs equal channels on every level.
        num_anchors (int or list[int]): anchors per spatial position, per level or one for
            all (the anchor generator's ``num_anchors``).
        box_dim, conv_dims, norm: as :class:`SharedRPNHead`.
        shared (bool): one head for all levels (True) or a head per level (False).
        num_levels (int or None): number of levels; needed only when both ``in_channels`` and
            ``num_anchors`` are ints and the head is not shared.

    Returns:
        nn.Module: the head; ``forward(features: List[Tensor])`` gives per-level objectness
        logits `(N, Ai, Hi, Wi)` and anchor deltas `(N, Ai*B, Hi, Wi)`.
    """
    if not isinstance(shared, bool):
        raise ValueError(f"MODEL.RPN.SHARED_HEAD must be True or False, got {shared!r}")
    if num_levels is None:
        lists = [len(v) for v in (in_channels, num_anchors) if not isinstance(v, int)]
        num_levels = lists[0] if lists else 1
        if not lists and not shared:
            raise ValueError("PerLevelRPNHead(shared=False) needs per-level lists or num_levels")
    channels = per_level_ints(in_channels, num_levels, "in_channels")
    anchors = per_level_ints(num_anchors, num_levels, "num_anchors")
    layer_args = dict(box_dim=box_dim, conv_dims=conv_dims, norm=norm)
    if not shared:
        return UnsharedRPNHead(in_channels=channels, num_anchors=anchors, **layer_args)
    if len(set(channels)) != 1:
        raise ValueError(
            f"MODEL.RPN.SHARED_HEAD=True shares one head across MODEL.RPN.IN_FEATURES, whose "
            f"channels differ: {channels}; set MODEL.RPN.SHARED_HEAD: False for a head per level"
        )
    if len(set(anchors)) == 1:
        return SharedRPNHead(in_channels=channels[0], num_anchors=anchors[0], **layer_args)
    return SharedConvGroupedRPNHead(in_channels=channels[0], num_anchors=anchors, **layer_args)
