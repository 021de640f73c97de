"""
``ConvUpsampleMaskHead``: Mask R-CNN's FCN mask head, numerically identical to Detectron2's
``MaskRCNNConvUpsampleHead`` by default, with switches for its variants.

Layers (in order): ``mask_fcn1..mask_fcnN`` 3x3 convs (+ norm) + ReLU, a 2x upsampling
(``deconv`` 2x2 stride-2 transposed conv, or ``upsample`` interpolation + ``upsample_conv``
3x3 conv), ReLU, and the 1x1 ``predictor``. Parameter names match Detectron2's, so its
checkpoints load with no missing or unexpected keys.
"""
from typing import Dict, List, Union

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    BaseMaskRCNNHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import Instances
from torch import nn

from ..utils.registry import register
from .config import UPSAMPLE_MODES

__all__ = [
    "ConvUpsampleMaskHead",
    "conv_norm_relu",
    "upsample_layers",
    "check_mask_head_cfg",
    "mask_head_outputs",
]


def conv_norm_relu(
    in_channels: int, out_channels: int, norm: str = "", init: bool = True
) -> Conv2d:
    """3x3 stride-1 conv (bias only without norm), optional norm, ReLU; MSRA-initialised."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=nn.ReLU(),
    )
    if init:
        weight_init.c2_msra_fill(conv)
    return conv


def upsample_layers(
    mode: str, in_channels: int, out_channels: int, norm: str = "", init: bool = True
):
    """
    The (name, module) pairs that double the spatial size of a ``(B, in_channels, R, R)`` map
    into ``(B, out_channels, 2R, 2R)``, ending with a ReLU.

    Args:
        mode (str): "deconv" (2x2 stride-2 transposed conv, as Detectron2; no norm, like it)
            or "bilinear" / "nearest" (interpolation, then a 3x3 conv with ``norm``).
        init (bool): MSRA-initialise the conv now (False: the caller does it).
    """
    if mode == "deconv":
        deconv = ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, padding=0)
        if init:
            weight_init.c2_msra_fill(deconv)
        return [("deconv", deconv), ("deconv_relu", nn.ReLU())]
    if mode in ("bilinear", "nearest"):
        align = False if mode == "bilinear" else None
        return [
            ("upsample", nn.Upsample(scale_factor=2.0, mode=mode, align_corners=align)),
            ("upsample_conv", conv_norm_relu(in_channels, out_channels, norm, init)),
        ]
    raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")


def mask_predictor(in_channels: int, num_classes: int, init: bool = True) -> Conv2d:
    """1x1 conv to per-class logits; tiny init so early training starts near p=0.5 everywhere."""
    predictor = Conv2d(in_channels, num_classes, kernel_size=1, stride=1, padding=0)
    if init:
        init_predictor_(predictor)
    return predictor


def init_predictor_(predictor: nn.Module) -> None:
    nn.init.normal_(predictor.weight, std=0.001)
    nn.init.constant_(predictor.bias, 0)


def check_mask_head_cfg(cfg) -> None:
    """
    Validate the ROI_MASK_HEAD keys every plugin mask head reads; raise ``ValueError`` naming
    the full key and the offending value.
    """
    head = cfg.MODEL.ROI_MASK_HEAD
    if head.NUM_CONV < 0:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.NUM_CONV must be >= 0, got {head.NUM_CONV}")
    if head.CONV_DIM <= 0:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.CONV_DIM must be > 0, got {head.CONV_DIM}")
    if head.POOLER_RESOLUTION <= 0:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION must be > 0, got {head.POOLER_RESOLUTION}"
        )
    if head.UPSAMPLE_MODE not in UPSAMPLE_MODES:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.UPSAMPLE_MODE must be one of {UPSAMPLE_MODES}, "
            f"got {head.UPSAMPLE_MODE!r}"
        )
    if not head.CLS_AGNOSTIC_MASK and cfg.MODEL.ROI_HEADS.NUM_CLASSES <= 0:
        raise ValueError(
            f"MODEL.ROI_HEADS.NUM_CLASSES must be > 0, got {cfg.MODEL.ROI_HEADS.NUM_CLASSES}"
        )
    if head.NORM:
        # get_norm raises KeyError for unknown names and GroupNorm fails on channel counts
        # it cannot split; surface both as config errors now, not at the first forward.
        try:
            get_norm(head.NORM, head.CONV_DIM)
        except Exception as e:
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.NORM={head.NORM!r} is not usable with "
                f"MODEL.ROI_MASK_HEAD.CONV_DIM={head.CONV_DIM}: {e}"
            ) from e


def mask_head_outputs(
    head: nn.Module, mask_logits: torch.Tensor, instances: List[Instances]
) -> Union[Dict[str, torch.Tensor], List[Instances]]:
    """
    What a mask head returns from its logits ``(B, C or 1, M, M)``: ``{"loss_mask": ...}``
    (Detectron2's ``mask_rcnn_loss`` times ``head.loss_weight``) in training, else the
    instances with ``pred_masks`` (Detectron2's ``mask_rcnn_inference``).
    """
    if head.training:
        loss = mask_rcnn_loss(mask_logits, instances, head.vis_period)
        return {"loss_mask": loss * head.loss_weight}
    mask_rcnn_inference(mask_logits, instances)
    return instances


# A Sequential (like Detectron2's head) so that `layers` is a TorchScript-friendly loop over
# the children in registration order, and parameter names stay Detectron2's.
@register(ROI_MASK_HEAD_REGISTRY)
class ConvUpsampleMaskHead(BaseMaskRCNNHead, nn.Sequential):
    """
    FCN mask head: ``num_conv`` 3x3 convs, a 2x upsampling and a 1x1 per-class predictor.

    With ``upsample_mode="deconv"`` (the default) it is Detectron2's
    ``MaskRCNNConvUpsampleHead``: same parameters, names, initialisation, logits and loss.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dims: List[int],
        conv_norm: str = "",
        upsample_mode: str = "deconv",
        loss_weight: float = 1.0,
        vis_period: int = 0,
    ):
        """
        Args:
            input_shape (ShapeSpec): the pooled ROI features, ``(B, channels, R, R)``.
            num_classes (int): foreground classes; 1 for class-agnostic masks.
            conv_dims (list[int]): output channels of the N-1 3x3 convs, then of the
                upsampling layer (N >= 1).
            conv_norm (str): norm of the 3x3 convs (``detectron2.layers.get_norm`` names),
                "" for none.
            upsample_mode (str): "deconv", "bilinear" or "nearest" (see ``upsample_layers``).
            loss_weight (float): multiplier of the mask loss.
            vis_period (int): period of mask visualisations in the event storage (0: never).
        """
        super().__init__(vis_period=vis_period)
        if len(conv_dims) < 1:
            raise ValueError("conv_dims must hold at least the upsampling layer's channels")
        if not isinstance(input_shape, ShapeSpec):
            raise ValueError(
                "ConvUpsampleMaskHead needs pooled ROI features: set "
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE (e.g. 'ROIAlignV2'), got a dict of feature maps"
            )
        self.loss_weight = loss_weight
        self.upsample_mode = upsample_mode
        channels = input_shape.channels
        # Create every layer first and initialise afterwards, in Detectron2's order: with the
        # same torch seed this head starts from exactly the weights Detectron2's head gets.
        convs = []
        for k, dim in enumerate(conv_dims[:-1]):
            conv = conv_norm_relu(channels, dim, conv_norm, init=False)
            self.add_module(f"mask_fcn{k + 1}", conv)
            convs.append(conv)
            channels = dim
        upsample = upsample_layers(upsample_mode, channels, conv_dims[-1], conv_norm, init=False)
        for name, module in upsample:
            self.add_module(name, module)
            if name in ("deconv", "upsample_conv"):
                convs.append(module)
        self.predictor = mask_predictor(conv_dims[-1], num_classes, init=False)
        for conv in convs:
            weight_init.c2_msra_fill(conv)
        init_predictor_(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mask_head_cfg(cfg)
        head = cfg.MODEL.ROI_MASK_HEAD
        if not isinstance(input_shape, ShapeSpec):
            raise ValueError(
                f"{head.NAME} needs pooled ROI features: MODEL.ROI_MASK_HEAD.POOLER_TYPE must "
                f"name a pooler (e.g. 'ROIAlignV2'), got {head.POOLER_TYPE!r}"
            )
        return {
            "input_shape": input_shape,
            "num_classes": 1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dims": [head.CONV_DIM] * (head.NUM_CONV + 1),  # +1: the upsampling layer
            "conv_norm": head.NORM,
            "upsample_mode": head.UPSAMPLE_MODE,
            "vis_period": cfg.VIS_PERIOD,
        }

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): pooled ROI features ``(B, C, R, R)``.

        Returns:
            Tensor: mask logits ``(B, num_classes, 2R, 2R)``.
        """
        for layer in self:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """
        Args:
            x (Tensor): pooled ROI features ``(B, C, R, R)``, B = total instances.
            instances (list[Instances]): per image; in training the foreground proposals
                with ``proposal_boxes``, ``gt_classes``, ``gt_masks``; in inference the
                detections with ``pred_classes``.

        Returns:
            ``{"loss_mask": Tensor}`` in training; in inference ``instances`` with
            ``pred_masks`` ``(Bi, 1, 2R, 2R)`` mask probabilities.
        """
        return mask_head_outputs(self, self.layers(x), instances)
