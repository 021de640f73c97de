"""
Layers of the plugin's mask heads (``ConvUpsampleMaskHead``, ``PANetMaskHead``): the FCN's
3x3 convs, the 2x upsampling, the per-class predictor and PANet's fused fc branch, each with
Detectron2's initialisation and parameter names.
"""
from typing import List, Tuple

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ConvTranspose2d
from torch import nn

from ..layers import align_corners, conv3x3

__all__ = [
    "conv_norm_relu",
    "mask_fcn_convs",
    "upsample_layers",
    "mask_predictor",
    "init_mask_predictor_",
    "fused_fc_layers",
]

NamedModules = List[Tuple[str, nn.Module]]


def conv_norm_relu(
    in_channels: int, out_channels: int, norm: str = "", init: bool = True
) -> Conv2d:
    """
    3x3 stride-1 conv (bias only without norm), optional norm, ReLU:
    `(B, in_channels, R, R)` -> `(B, out_channels, R, R)`.

    Args:
        init (bool): MSRA-initialise now (False: the caller does it, in its own order).
    """
    conv = conv3x3(in_channels, out_channels, norm, relu=True)
    if init:
        weight_init.c2_msra_fill(conv)
    return conv


def mask_fcn_convs(conv_dims: List[int], first: int, end: int, norm: str = "") -> nn.Sequential:
    """
    The FCN's 3x3 convs ``mask_fcn{k + 1}`` for ``k`` in ``[first, end)``, conv k taking
    ``conv_dims[k - 1]`` channels to ``conv_dims[k]`` (created and MSRA-initialised in order),
    as one Sequential; empty when ``end <= first``.
    """
    convs = nn.Sequential()
    for k in range(first, end):
        convs.add_module(f"mask_fcn{k + 1}", conv_norm_relu(conv_dims[k - 1], conv_dims[k], norm))
    return convs


def upsample_layers(
    mode: str, in_channels: int, out_channels: int, norm: str = "", init: bool = True
) -> NamedModules:
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
    return [
        ("upsample", nn.Upsample(scale_factor=2.0, mode=mode, align_corners=align_corners(mode))),
        ("upsample_conv", conv_norm_relu(in_channels, out_channels, norm, init)),
    ]


def mask_predictor(in_channels: int, num_classes: int, init: bool = True) -> Conv2d:
    """1x1 conv to per-class logits: `(B, in_channels, M, M)` -> `(B, num_classes, M, M)`."""
    predictor = Conv2d(in_channels, num_classes, kernel_size=1, stride=1, padding=0)
    if init:
        init_mask_predictor_(predictor)
    return predictor


def init_mask_predictor_(predictor: nn.Module) -> None:
    """Tiny init, so early training starts near p = 0.5 everywhere (Detectron2's)."""
    nn.init.normal_(predictor.weight, std=0.001)
    nn.init.constant_(predictor.bias, 0)


def fused_fc_layers(in_channels: int, resolution: int, norm: str = "") -> NamedModules:
    """
    PANet's fully-connected branch, as (name, module) pairs applied in order: ``fc_conv1``
    (3x3, ``in_channels``), ``fc_conv2`` (3x3, half the channels) and ``fc``, a linear layer
    from the flattened `(B, in_channels // 2 * R * R)` map to one class-agnostic
    `(B, 2R * 2R)` mask logit map.

    Args:
        in_channels (int): C of the tapped `(B, C, R, R)` features, >= 2.
        resolution (int): R.
        norm (str): norm of the two convs.
    """
    half = in_channels // 2
    # Created and initialised in this order: the random-number order of a fresh build.
    conv1 = conv_norm_relu(in_channels, in_channels, norm)
    conv2 = conv_norm_relu(in_channels, half, norm)
    fc = nn.Linear(half * resolution * resolution, (2 * resolution) ** 2)
    # Small init: at the start the head behaves as the plain FCN head.
    nn.init.normal_(fc.weight, std=0.001)
    nn.init.constant_(fc.bias, 0)
    return [("fc_conv1", conv1), ("fc_conv2", conv2), ("fc", fc)]
