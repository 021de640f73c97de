"""Conv factories shared by the components (the neck, the RPN head and the mask heads)."""
from typing import Optional

from detectron2.layers import Conv2d, get_norm
from torch import nn

__all__ = ["conv3x3"]


def conv3x3(
    in_channels: int, out_channels: int, norm: str = "", stride: int = 1, relu: bool = False
) -> Conv2d:
    """
    A 3x3 conv (padding 1), then ``norm`` and an optional ReLU, as Detectron2's heads and FPN
    build theirs: the conv has a bias only without a norm (a norm's own bias replaces it).

    Weights keep PyTorch's default initialisation, drawn when the conv is created; callers
    apply their component's own init (Xavier, MSRA, N(0, 0.01)) afterwards, in Detectron2's
    order, so a fresh build with a given seed matches Detectron2's.

    Args:
        in_channels, out_channels (int): channels of the input `(N, Cin, H, W)` and output
            `(N, Cout, H / stride, W / stride)`.
        norm (str): any name :func:`detectron2.layers.get_norm` accepts, "" for none.
        stride (int): 1, or 2 to halve the resolution.
        relu (bool): apply a ReLU after the norm.
    """
    activation: Optional[nn.Module] = nn.ReLU() if relu else None
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=1,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=activation,
    )
