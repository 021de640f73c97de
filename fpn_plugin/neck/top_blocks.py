"""
Extra pyramid levels above the last one, chosen by name (``MODEL.FPN.TOP_BLOCK``).

Detectron2 hard-codes the top block per builder (max-pool P6 for Mask R-CNN, P6/P7 convs
for RetinaNet). Here one function maps a name to Detectron2's own top-block modules, so the
parameter names (``top_block.p6.*``, ``top_block.p7.*``) and the initialisation stay those of
Detectron2 and its checkpoints load unchanged.
"""
from typing import Optional

from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import nn

__all__ = ["TOP_BLOCKS", "build_top_block"]

TOP_BLOCKS = ("none", "maxpool", "p6p7_res5", "p6p7_p5")


def build_top_block(
    name: str,
    last_in_feature: str,
    last_in_channels: int,
    last_level: str,
    out_channels: int,
) -> Optional[nn.Module]:
    """
    Args:
        name (str): one of :data:`TOP_BLOCKS`.
        last_in_feature (str): the last (coarsest) backbone feature fed to the neck, e.g. "res5".
        last_in_channels (int): its channel count.
        last_level (str): the coarsest pyramid level made from the inputs, e.g. "p5".
        out_channels (int): channels of the pyramid.

    Returns:
        nn.Module or None: a module with attributes ``num_levels`` (extra levels it adds)
        and ``in_feature`` (name of the map it reads: a backbone feature or a pyramid
        level), returning a list of ``num_levels`` maps, each at half the previous
        resolution; None for "none".
    """
    if name == "none":
        return None
    if name == "maxpool":
        block = LastLevelMaxPool()
        # Detectron2 fixes "p5"; reading the actual last level also serves res2..res4 inputs.
        block.in_feature = last_level
        return block
    if name == "p6p7_res5":
        block = LastLevelP6P7(last_in_channels, out_channels)
        block.in_feature = last_in_feature
        return block
    if name == "p6p7_p5":
        block = LastLevelP6P7(out_channels, out_channels)
        block.in_feature = last_level
        return block
    raise ValueError(f"top block must be one of {list(TOP_BLOCKS)}, got {name!r}")
