"""
Backbone builders that put the neck on a bottom-up backbone, registered in Detectron2's
``BACKBONE_REGISTRY`` (``MODEL.BACKBONE.NAME``), and the choice of the neck class.

Both builders take the same path: check the config has the plugin's keys, pick the neck class
(:class:`~fpn_plugin.neck.fpn.CustomFPN`, or the variant a ``MODEL.FPN`` switch turns on),
build the bottom-up backbone, and hand it to the neck's ``from_config``.
"""
from typing import Callable, Dict, Type

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..utils.config import require_plugin_keys
from ..utils.registry import register
from .config import add_neck_config
from .fpn import CustomFPN

__all__ = [
    "build_resnet_custom_fpn_backbone",
    "build_custom_fpn_backbone",
    "neck_class",
    "register_neck_variant",
    "NECK_VARIANTS",
]

# MODEL.FPN switch key (a bool) -> the CustomFPN subclass it turns on. With no switch on, the
# neck is CustomFPN itself (Detectron2's FPN with the defaults).
NECK_VARIANTS: Dict[str, Type[CustomFPN]] = {}


def register_neck_variant(switch_key: str) -> Callable[[Type[CustomFPN]], Type[CustomFPN]]:
    """
    Class decorator: ``MODEL.FPN.<switch_key>: True`` builds the decorated CustomFPN
    subclass. A new pathway variant is its module (the subclass, decorated) and its switch
    key in :func:`~fpn_plugin.neck.config.add_neck_config`; the key may be dotted, for a
    variant with its own group of keys (``"BIFPN.ENABLED"``).
    """

    def deco(cls):
        NECK_VARIANTS[switch_key] = cls
        return cls

    return deco


def neck_class(cfg) -> Type[CustomFPN]:
    """
    The neck class ``cfg.MODEL.FPN``'s variant switches ask for.

    Raises:
        ValueError: a switch that is not a bool, or more than one switched on (naming keys).
    """
    on = []
    for key, cls in NECK_VARIANTS.items():
        value = cfg.MODEL.FPN
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, bool):
            raise ValueError(f"MODEL.FPN.{key}={value!r} must be True or False")
        if value:
            on.append(key)
    if len(on) > 1:
        raise ValueError(f"MODEL.FPN: at most one of {on} can be True (each is its own neck)")
    return NECK_VARIANTS[on[0]] if on else CustomFPN


def _build_neck(cfg, input_shape: ShapeSpec, build_bottom_up) -> Backbone:
    require_plugin_keys(cfg, add_neck_config, "the FPN neck (MODEL.FPN)")
    cls = neck_class(cfg)
    return cls(cfg, input_shape, bottom_up=build_bottom_up(cfg, input_shape))


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
    return _build_neck(cfg, input_shape, build_resnet_backbone)


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
    return _build_neck(cfg, input_shape, _build_named_bottom_up)


def _build_named_bottom_up(cfg, input_shape: ShapeSpec) -> Backbone:
    key = "MODEL.FPN.BOTTOM_UP_BACKBONE"
    name = cfg.MODEL.FPN.BOTTOM_UP_BACKBONE
    try:
        builder = BACKBONE_REGISTRY.get(name)
    except KeyError:
        raise ValueError(
            f"{key}={name!r} is not registered in BACKBONE_REGISTRY "
            f"(registered: {sorted(n for n, _ in BACKBONE_REGISTRY)})"
        ) from None
    if builder is build_custom_fpn_backbone:  # it would call itself without end
        raise ValueError(f"{key}={name!r}: the neck cannot be its own bottom-up backbone")
    bottom_up = builder(cfg, input_shape)
    if not isinstance(bottom_up, Backbone):
        raise ValueError(
            f"{key}={name!r} returned a {type(bottom_up).__name__}, not a detectron2 Backbone"
        )
    return bottom_up
