"""
Backbone builders that put :class:`~fpn_plugin.neck.fpn.CustomFPN` on a bottom-up backbone,
registered in Detectron2's ``BACKBONE_REGISTRY`` (``MODEL.BACKBONE.NAME``).
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..utils.registry import register
from .fpn import CustomFPN

__all__ = ["build_resnet_custom_fpn_backbone", "build_custom_fpn_backbone"]


@register(BACKBONE_REGISTRY)
def build_resnet_custom_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """
    ResNet (``MODEL.RESNETS``) + the neck (``MODEL.FPN``). With the neck's default keys this
    is Detectron2's ``build_resnet_fpn_backbone``: same outputs, same parameter names.

    Args:
        cfg (CfgNode): a config with ``add_fpn_plugin_config`` applied.
        input_shape (ShapeSpec): image input shape (channels = len(MODEL.PIXEL_MEAN)).

    Returns:
        CustomFPN: a Backbone with outputs "p<stage>" (see ``output_shape()``).
    """
    return CustomFPN(cfg, input_shape, bottom_up=build_resnet_backbone(cfg, input_shape))


@register(BACKBONE_REGISTRY)
def build_custom_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """
    The neck on any registered bottom-up backbone, the one named by
    ``MODEL.FPN.BOTTOM_UP_BACKBONE`` (called as ``builder(cfg, input_shape)``; it must return a
    Backbone producing ``MODEL.FPN.IN_FEATURES``).

    Args:
        cfg (CfgNode): a config with ``add_fpn_plugin_config`` applied.
        input_shape (ShapeSpec): image input shape.

    Returns:
        CustomFPN: a Backbone with outputs "p<stage>".
    """
    return CustomFPN(cfg, input_shape)
