"""
``PANetMaskHead``: the mask head of PANet (Liu et al., *Path Aggregation Network for Instance
Segmentation*), built from the pyramid idea, with two switches:

- adaptive feature pooling (:class:`~fpn_plugin.mask_head.pooling.MultiLevelROIAlign`): each
  ROI is pooled from every pyramid level; each level gets its own first 3x3 conv and the
  levels are fused element-wise (max in the paper);
- a fused fully-connected branch (:func:`~fpn_plugin.mask_head.layers.fused_fc_layers`): from
  the second-to-last conv, two 3x3 convs (the second halves the channels) and an fc layer
  predict one class-agnostic mask-logit map which is added to every class's FCN logits; the
  fc sees the whole ROI at once, complementing the FCN's local receptive field.

With both switches off it computes exactly what ``ConvUpsampleMaskHead`` computes.
"""
from collections import OrderedDict
from typing import Dict, List, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    BaseMaskRCNNHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import Instances
from torch import nn

from ..layers import check_fuse_type, fuse_levels
from ..utils.config import require_plugin_keys
from ..utils.registry import register
from .config import (
    ADAPTIVE_POOLER_TYPES,
    LEVEL_FUSE_TYPES,
    add_mask_head_config,
    check_head_args,
    head_args_from_config,
)
from .layers import (
    conv_norm_relu,
    fused_fc_layers,
    mask_fcn_convs,
    mask_predictor,
    upsample_layers,
)
from .pooling import MultiLevelROIAlign

__all__ = ["PANetMaskHead"]


@register(ROI_MASK_HEAD_REGISTRY)
class PANetMaskHead(BaseMaskRCNNHead):
    """
    FCN mask head with PANet's adaptive multi-level pooling and fused fc branch (each
    switchable). Output: mask logits ``(B, num_classes, 2R, 2R)``, as Detectron2's head.

    Parameters: ``fcn1_per_level.{l}`` (one first conv per pooled level), ``fcn_trunk`` and
    ``fcn_tail`` (the other convs ``mask_fcn{k}``, split where the fc branch taps),
    ``upsample.*``, ``predictor``, and with the fc branch ``fc_conv1``, ``fc_conv2``, ``fc``.
    """

    in_features: List[str]
    fuse_type: torch.jit.Final[str]
    fused_fc: torch.jit.Final[bool]

    @configurable
    def __init__(
        self,
        input_shape: Union[ShapeSpec, Dict[str, ShapeSpec]],
        *,
        num_classes: int,
        conv_dims: List[int],
        conv_norm: str = "",
        upsample_mode: str = "deconv",
        pooler_resolution: int = 14,
        pooler_sampling_ratio: int = 0,
        pooler_type: str = "ROIAlignV2",
        fuse_type: str = "max",
        fused_fc: bool = True,
        loss_weight: float = 1.0,
        vis_period: int = 0,
    ):
        """
        Args:
            input_shape: a dict ``{level name: ShapeSpec}`` of feature maps for adaptive
                pooling (the head pools itself, from every level in the dict's order), or
                one ``ShapeSpec`` of already pooled ``(B, C, R, R)`` ROI features.
            num_classes (int): foreground classes; 1 for class-agnostic masks.
            conv_dims (list[int]): output channels of the N >= 1 3x3 convs, then of the
                upsampling layer (so ``len(conv_dims) >= 2``).
            conv_norm (str): norm of the 3x3 convs, "" for none.
            upsample_mode (str): "deconv", "nearest" or "bilinear".
            pooler_resolution (int): R, side of the pooled ROI features (adaptive pooling).
            pooler_sampling_ratio (int): ROIAlign samples per bin, 0 adaptive (adaptive pooling).
            pooler_type (str): "ROIAlignV2" (aligned) or "ROIAlign" (adaptive pooling).
            fuse_type (str): "max", "sum" or "avg" ("mean") fusion of the per-level features.
            fused_fc (bool): add the fully-connected branch.
            loss_weight (float): multiplier of the mask loss.
            vis_period (int): period of mask visualisations (0: never).

        Raises:
            ValueError: on an invalid argument, naming the config key that sets it.
        """
        super().__init__(loss_weight=loss_weight, vis_period=vis_period)
        adaptive = isinstance(input_shape, dict)
        resolution = pooler_resolution if adaptive else input_shape.height
        self.fuse_type = _check_panet_args(
            num_classes, conv_dims, conv_norm, upsample_mode, resolution, pooler_type,
            fuse_type, fused_fc,
        )
        self.fused_fc = fused_fc
        if adaptive:
            self.in_features = list(input_shape)
            in_channels = _level_channels(input_shape)
            self.pooler = MultiLevelROIAlign(
                pooler_resolution,
                [1.0 / input_shape[f].stride for f in self.in_features],
                pooler_sampling_ratio,
                aligned=pooler_type == "ROIAlignV2",
            )
        else:
            # One "level": the pooled input.
            self.in_features = []
            in_channels = input_shape.channels
            self.pooler = None

        # Layers in creation (random-number) order. The first conv adapts each level on its
        # own (PANet); the fc branch taps the output of conv `tap` (conv3 of 4).
        num_conv = len(conv_dims) - 1
        tap = _fc_tap(num_conv)
        self.fcn1_per_level = nn.ModuleList(
            conv_norm_relu(in_channels, conv_dims[0], conv_norm)
            for _ in range(max(len(self.in_features), 1))
        )
        self.fcn_trunk = mask_fcn_convs(conv_dims, 1, tap, conv_norm)
        self.fcn_tail = mask_fcn_convs(conv_dims, tap, num_conv, conv_norm)
        self.upsample = nn.Sequential(
            OrderedDict(upsample_layers(upsample_mode, conv_dims[-2], conv_dims[-1], conv_norm))
        )
        self.predictor = mask_predictor(conv_dims[-1], num_classes)
        if fused_fc:
            for name, module in fused_fc_layers(conv_dims[tap - 1], resolution, conv_norm):
                self.add_module(name, module)

    @classmethod
    def from_config(cls, cfg, input_shape):
        require_plugin_keys(cfg, add_mask_head_config, "PANetMaskHead")
        head = cfg.MODEL.ROI_MASK_HEAD
        panet = head.PANET
        _check_pooling_keys(panet.ADAPTIVE_POOLING, head.POOLER_TYPE, input_shape)
        return dict(
            head_args_from_config(cfg, input_shape),
            pooler_resolution=head.POOLER_RESOLUTION,
            pooler_sampling_ratio=head.POOLER_SAMPLING_RATIO,
            pooler_type=panet.POOLER_TYPE,
            fuse_type=panet.FUSE_TYPE,
            fused_fc=panet.FUSED_FC,
        )

    def layers(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            pooled (list[Tensor]): per-level ROI features, each ``(B, C, R, R)``; one entry
                per ``fcn1_per_level`` conv.

        Returns:
            Tensor: mask logits ``(B, num_classes, 2R, 2R)``.
        """
        adapted: List[torch.Tensor] = []
        for level, conv in enumerate(self.fcn1_per_level):
            adapted.append(conv(pooled[level]))
        x = fuse_levels(adapted, self.fuse_type)
        x = self.fcn_trunk(x)
        tapped = x
        x = self.fcn_tail(x)
        logits = self.predictor(self.upsample(x))
        if self.fused_fc:
            fc_in = self.fc_conv2(self.fc_conv1(tapped)).flatten(1)
            side = logits.shape[-1]
            # One class-agnostic map, broadcast onto every class's logits.
            logits = logits + self.fc(fc_in).reshape(-1, 1, side, side)
        return logits

    def pool(
        self, features: Dict[str, torch.Tensor], instances: List[Instances]
    ) -> List[torch.Tensor]:
        """
        Pool each instance's box (``proposal_boxes`` in training, ``pred_boxes`` in
        inference) from every level of ``features``.

        Returns:
            list[Tensor]: one ``(B, C, R, R)`` per level in ``self.in_features`` order.
        """
        pooler = self.pooler
        if pooler is not None:
            if self.training:
                boxes = [x.proposal_boxes for x in instances]
            else:
                boxes = [x.pred_boxes for x in instances]
            rois = convert_boxes_to_pooler_format(boxes)
            return pooler([features[f] for f in self.in_features], rois)
        raise ValueError("PANetMaskHead was built for pooled ROI features, not feature maps")

    def forward(self, x: Union[Dict[str, torch.Tensor], torch.Tensor], instances: List[Instances]):
        """
        Args:
            x: ``{level name: (N, C, Hl, Wl)}`` feature maps with adaptive pooling
                (StandardROIHeads with ``POOLER_TYPE: ""``), else pooled ``(B, C, R, R)``.
            instances (list[Instances]): per image; in training the foreground proposals
                with ``proposal_boxes``, ``gt_classes``, ``gt_masks``; in inference the
                detections with ``pred_boxes`` and ``pred_classes``.

        Returns:
            ``{"loss_mask": Tensor}`` in training; in inference ``instances`` with
            ``pred_masks`` ``(Bi, 1, 2R, 2R)`` mask probabilities.
        """
        if isinstance(x, torch.Tensor):
            logits = self.layers([x])
        else:
            logits = self.layers(self.pool(x, instances))
        # BaseMaskRCNNHead.forward's two outcomes. Its forward cannot serve here: it hands
        # `layers` no boxes to pool with, and TorchScript has no super() to call it after
        # pooling.
        if self.training:
            loss = mask_rcnn_loss(logits, instances, self.vis_period)
            return {"loss_mask": loss * self.loss_weight}
        mask_rcnn_inference(logits, instances)
        return instances


def _fc_tap(num_conv: int) -> int:
    """The conv (1-based) whose output PANet's fc branch takes: the second-to-last."""
    return max(num_conv - 1, 1)


def _check_panet_args(
    num_classes, conv_dims, conv_norm, upsample_mode, resolution, pooler_type, fuse_type,
    fused_fc,
) -> str:
    """Validate PANetMaskHead's arguments, naming their keys; returns the canonical fuse_type."""
    check_head_args(
        "PANetMaskHead (levels are fused after the first conv)", num_classes, conv_dims,
        conv_norm, upsample_mode, resolution, min_convs=1,
    )
    if pooler_type not in ADAPTIVE_POOLER_TYPES:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.PANET.POOLER_TYPE must be one of {ADAPTIVE_POOLER_TYPES}, "
            f"got {pooler_type!r}"
        )
    tap_channels = conv_dims[_fc_tap(len(conv_dims) - 1) - 1]
    if fused_fc and tap_channels < 2:
        raise ValueError(
            "MODEL.ROI_MASK_HEAD.CONV_DIM must be >= 2 with MODEL.ROI_MASK_HEAD.PANET.FUSED_FC "
            f"(its second conv halves the channels), got {tap_channels}"
        )
    return check_fuse_type(fuse_type, LEVEL_FUSE_TYPES, "MODEL.ROI_MASK_HEAD.PANET.FUSE_TYPE")


def _level_channels(input_shape: Dict[str, ShapeSpec]) -> int:
    channels = {f: s.channels for f, s in input_shape.items()}
    if len(set(channels.values())) != 1:
        raise ValueError(
            "MODEL.ROI_HEADS.IN_FEATURES must have equal channels for PANetMaskHead's "
            f"adaptive pooling, got {channels}"
        )
    return next(iter(channels.values()))


def _check_pooling_keys(adaptive_pooling, pooler_type, input_shape) -> None:
    """
    MODEL.ROI_MASK_HEAD.PANET.ADAPTIVE_POOLING states what MODEL.ROI_MASK_HEAD.POOLER_TYPE
    implies (no pooler: the head gets the feature maps and pools itself); the head is built
    from what it gets, so the two keys are checked against each other here, where both are
    read.
    """
    got_levels = isinstance(input_shape, dict)
    if adaptive_pooling and not got_levels:
        raise ValueError(
            "MODEL.ROI_MASK_HEAD.PANET.ADAPTIVE_POOLING=True needs "
            "MODEL.ROI_MASK_HEAD.POOLER_TYPE='' (the head pools from every level itself), "
            f"got {pooler_type!r}"
        )
    if not adaptive_pooling and got_levels:
        raise ValueError(
            "MODEL.ROI_MASK_HEAD.PANET.ADAPTIVE_POOLING=False needs a pooler: set "
            f"MODEL.ROI_MASK_HEAD.POOLER_TYPE (e.g. 'ROIAlignV2'), got {pooler_type!r}"
        )
