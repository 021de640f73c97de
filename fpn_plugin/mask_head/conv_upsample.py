"""
``ConvUpsampleMaskHead``: Mask R-CNN's FCN mask head, numerically identical to Detectron2's
``MaskRCNNConvUpsampleHead`` by default, with options for convs, norm, upsampling and
class-agnostic masks.

Layers (in order): ``mask_fcn1..mask_fcnN`` 3x3 convs (+ norm) + ReLU, a 2x upsampling
(``deconv`` 2x2 stride-2 transposed conv, or ``upsample`` interpolation + ``upsample_conv``
3x3 conv), ReLU, and the 1x1 ``predictor``. Parameter names match Detectron2's, so its
checkpoints load with no missing or unexpected keys. Loss and inference are
``BaseMaskRCNNHead.forward``'s (Detectron2's); the head defines ``layers`` only.
"""
from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
from torch import nn

from ..utils.config import require_plugin_keys
from ..utils.registry import register
from .config import add_mask_head_config, check_head_args, head_args_from_config
from .layers import conv_norm_relu, init_mask_predictor_, mask_predictor, upsample_layers

__all__ = ["ConvUpsampleMaskHead"]


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
            upsample_mode (str): "deconv", "nearest" or "bilinear" (see ``upsample_layers``).
            loss_weight (float): multiplier of the mask loss.
            vis_period (int): period of mask visualisations in the event storage (0: never).

        Raises:
            ValueError: on an invalid argument, naming the config key that sets it.
        """
        super().__init__(loss_weight=loss_weight, vis_period=vis_period)
        if not isinstance(input_shape, ShapeSpec):
            # StandardROIHeads hands a dict of feature maps exactly when it has no pooler.
            raise ValueError(
                "ConvUpsampleMaskHead needs pooled ROI features, but "
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE='' (no pooler) hands it the feature maps: "
                "set MODEL.ROI_MASK_HEAD.POOLER_TYPE (e.g. 'ROIAlignV2')"
            )
        check_head_args(
            "ConvUpsampleMaskHead", num_classes, conv_dims, conv_norm, upsample_mode,
            input_shape.height,
        )
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
        init_mask_predictor_(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape):
        require_plugin_keys(cfg, add_mask_head_config, "ConvUpsampleMaskHead")
        return head_args_from_config(cfg, input_shape)

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
