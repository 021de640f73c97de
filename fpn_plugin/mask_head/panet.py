"""
``PANetMaskHead``: the mask head of PANet (Liu et al., *Path Aggregation Network for Instance
Segmentation*), built from the pyramid idea, with two switches:

- adaptive feature pooling: each ROI is pooled from every pyramid level; each level gets its
  own first 3x3 conv and the levels are fused element-wise (max in the paper);
- a fused fully-connected branch: from the second-to-last conv, two 3x3 convs (the second
  halves the channels) and an fc layer predict one class-agnostic mask-logit map which is
  added to every class's FCN logits; the fc sees the whole ROI at once, complementing the
  FCN's local receptive field.

With both switches off it computes exactly what ``ConvUpsampleMaskHead`` computes.
"""
from typing import Dict, List, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
from detectron2.structures import Instances
from torch import nn

from ..utils.registry import register
from .config import ADAPTIVE_POOLER_TYPES, LEVEL_FUSE_TYPES
from .conv_upsample import (
    check_mask_head_cfg,
    conv_norm_relu,
    mask_head_outputs,
    mask_predictor,
    upsample_layers,
)
from .pooling import fuse_levels, roi_align_all_levels

__all__ = ["PANetMaskHead"]


@register(ROI_MASK_HEAD_REGISTRY)
class PANetMaskHead(BaseMaskRCNNHead):
    """
    FCN mask head with PANet's adaptive multi-level pooling and fused fc branch (each
    switchable). Output: mask logits ``(B, num_classes, 2R, 2R)``, as Detectron2's head.
    """

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
        pooler_aligned: bool = True,
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
            upsample_mode (str): "deconv", "bilinear" or "nearest".
            pooler_resolution (int): R, side of the pooled ROI features (adaptive pooling).
            pooler_sampling_ratio (int): ROIAlign samples per bin, 0 adaptive (adaptive pooling).
            pooler_aligned (bool): ROIAlignV2 (True) or legacy ROIAlign (adaptive pooling).
            fuse_type (str): "max", "sum" or "mean" fusion of the per-level features.
            fused_fc (bool): add the fully-connected branch.
            loss_weight (float): multiplier of the mask loss.
            vis_period (int): period of mask visualisations (0: never).
        """
        super().__init__(vis_period=vis_period)
        if len(conv_dims) < 2:
            raise ValueError("PANetMaskHead needs at least one 3x3 conv before the upsampling")
        if fuse_type not in LEVEL_FUSE_TYPES:
            raise ValueError(f"fuse_type must be one of {LEVEL_FUSE_TYPES}, got {fuse_type!r}")
        self.loss_weight = loss_weight
        self.adaptive_pooling = isinstance(input_shape, dict)
        if self.adaptive_pooling:
            self.in_features = list(input_shape.keys())
            channels_per_level = [input_shape[f].channels for f in self.in_features]
            if len(set(channels_per_level)) != 1:
                raise ValueError(f"all pooled levels need equal channels, got {channels_per_level}")
            in_channels = channels_per_level[0]
            self.scales = [1.0 / input_shape[f].stride for f in self.in_features]
            resolution = pooler_resolution
        else:
            self.in_features = []
            in_channels = input_shape.channels
            self.scales = []
            resolution = input_shape.height
        self.pooler_resolution = resolution
        self.pooler_sampling_ratio = pooler_sampling_ratio
        self.pooler_aligned = pooler_aligned
        self.fuse_type = fuse_type
        self.fused_fc = fused_fc

        num_conv = len(conv_dims) - 1
        # The first conv adapts each level on its own (PANet); without adaptive pooling there
        # is one "level": the pooled input.
        self.fcn1_per_level = nn.ModuleList(
            conv_norm_relu(in_channels, conv_dims[0], conv_norm)
            for _ in range(max(len(self.in_features), 1))
        )
        # PANet taps the fc branch after the second-to-last conv (conv3 of 4).
        tap = max(num_conv - 1, 1)
        self.fcn_trunk = nn.Sequential()
        self.fcn_tail = nn.Sequential()
        for k in range(1, num_conv):
            block = conv_norm_relu(conv_dims[k - 1], conv_dims[k], conv_norm)
            (self.fcn_trunk if k < tap else self.fcn_tail).add_module(f"mask_fcn{k + 1}", block)
        self.upsample = nn.Sequential()
        for name, module in upsample_layers(
            upsample_mode, conv_dims[num_conv - 1], conv_dims[-1], conv_norm
        ):
            self.upsample.add_module(name, module)
        self.predictor = mask_predictor(conv_dims[-1], num_classes)

        if fused_fc:
            tap_channels = conv_dims[tap - 1]
            half = tap_channels // 2
            if half < 1:
                raise ValueError(f"the fused fc branch needs >= 2 channels, got {tap_channels}")
            self.fc_conv1 = conv_norm_relu(tap_channels, tap_channels, conv_norm)
            self.fc_conv2 = conv_norm_relu(tap_channels, half, conv_norm)
            mask_side = 2 * resolution
            self.fc = nn.Linear(half * resolution * resolution, mask_side * mask_side)
            # Small init: at the start the head behaves as the plain FCN head.
            nn.init.normal_(self.fc.weight, std=0.001)
            nn.init.constant_(self.fc.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mask_head_cfg(cfg)
        head = cfg.MODEL.ROI_MASK_HEAD
        panet = head.PANET
        if head.NUM_CONV < 1:
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.NUM_CONV must be >= 1 for {head.NAME} (levels are fused "
                f"after the first conv), got {head.NUM_CONV}"
            )
        if panet.FUSE_TYPE not in LEVEL_FUSE_TYPES:
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.PANET.FUSE_TYPE must be one of {LEVEL_FUSE_TYPES}, "
                f"got {panet.FUSE_TYPE!r}"
            )
        if panet.POOLER_TYPE not in ADAPTIVE_POOLER_TYPES:
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.PANET.POOLER_TYPE must be one of {ADAPTIVE_POOLER_TYPES}, "
                f"got {panet.POOLER_TYPE!r}"
            )
        if panet.FUSED_FC and head.CONV_DIM < 2:
            raise ValueError(
                "MODEL.ROI_MASK_HEAD.CONV_DIM must be >= 2 with MODEL.ROI_MASK_HEAD.PANET.FUSED_FC "
                f"(its second conv halves the channels), got {head.CONV_DIM}"
            )
        got_levels = isinstance(input_shape, dict)
        if panet.ADAPTIVE_POOLING and not got_levels:
            raise ValueError(
                "MODEL.ROI_MASK_HEAD.PANET.ADAPTIVE_POOLING=True needs "
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE='' (the head pools from every level itself), "
                f"got {head.POOLER_TYPE!r}"
            )
        if not panet.ADAPTIVE_POOLING and got_levels:
            raise ValueError(
                "MODEL.ROI_MASK_HEAD.PANET.ADAPTIVE_POOLING=False needs a pooler: set "
                f"MODEL.ROI_MASK_HEAD.POOLER_TYPE (e.g. 'ROIAlignV2'), got {head.POOLER_TYPE!r}"
            )
        if got_levels:
            channels = {f: s.channels for f, s in input_shape.items()}
            if len(set(channels.values())) != 1:
                raise ValueError(
                    f"MODEL.ROI_HEADS.IN_FEATURES must have equal channels for {head.NAME}'s "
                    f"adaptive pooling, got {channels}"
                )
        return {
            "input_shape": input_shape,
            "num_classes": 1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dims": [head.CONV_DIM] * (head.NUM_CONV + 1),
            "conv_norm": head.NORM,
            "upsample_mode": head.UPSAMPLE_MODE,
            "pooler_resolution": head.POOLER_RESOLUTION,
            "pooler_sampling_ratio": head.POOLER_SAMPLING_RATIO,
            "pooler_aligned": panet.POOLER_TYPE == "ROIAlignV2",
            "fuse_type": panet.FUSE_TYPE,
            "fused_fc": panet.FUSED_FC,
            "vis_period": cfg.VIS_PERIOD,
        }

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

    def pool(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """
        Pool each instance's box (``proposal_boxes`` in training, ``pred_boxes`` in
        inference) from every level of ``features``.

        Returns:
            list[Tensor]: one ``(B, C, R, R)`` per level in ``self.in_features`` order.
        """
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        rois = convert_boxes_to_pooler_format(boxes)
        return roi_align_all_levels(
            [features[f] for f in self.in_features],
            rois,
            self.pooler_resolution,
            self.scales,
            self.pooler_sampling_ratio,
            self.pooler_aligned,
        )

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
        pooled = self.pool(x, instances) if self.adaptive_pooling else [x]
        return mask_head_outputs(self, self.layers(pooled), instances)
