"""
Extra pyramid levels above the last one (the neck's injected ``top_block``), by name
(``MODEL.FPN.TOP_BLOCK``) or as a module.

Detectron2 hard-codes the top block per builder (max-pool P6 for Mask R-CNN, P6/P7 convs for
RetinaNet). Here one table maps a name to Detectron2's own top-block modules, so the parameter
names (``top_block.p6.*``, ``top_block.p7.*``) and the initialisation stay those of Detectron2
and its checkpoints load unchanged. A new named block is one row of ``_NAMED_TOP_BLOCKS``.
"""
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import nn

__all__ = ["TOP_BLOCKS", "build_top_block", "resolve_top_block"]

# name -> (reads the last backbone feature (True) or the last pyramid level (False),
#          module factory taking (channels of that input, out_channels)).
_NAMED_TOP_BLOCKS: Dict[str, Tuple[bool, Callable[[int, int], nn.Module]]] = {
    # P6 = max_pool(P5, kernel 1, stride 2): Faster/Mask R-CNN FPN.
    "maxpool": (False, lambda in_channels, out_channels: LastLevelMaxPool()),
    # P6/P7 3x3 stride-2 convs from res5: RetinaNet.
    "p6p7_res5": (True, LastLevelP6P7),
    # The same convs from P5: FCOS.
    "p6p7_p5": (False, LastLevelP6P7),
}
TOP_BLOCKS = ("none",) + tuple(_NAMED_TOP_BLOCKS)


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
    if name not in _NAMED_TOP_BLOCKS:
        raise ValueError(f"MODEL.FPN.TOP_BLOCK={name!r} is not one of {list(TOP_BLOCKS)}")
    reads_backbone, factory = _NAMED_TOP_BLOCKS[name]
    block = factory(last_in_channels if reads_backbone else out_channels, out_channels)
    # Detectron2 fixes "p5"/"res5"; naming the actual last input also serves other pyramids.
    block.in_feature = last_in_feature if reads_backbone else last_level
    return block


def resolve_top_block(
    top_block,
    in_features: List[str],
    input_shapes: Dict[str, ShapeSpec],
    level_names: List[str],
    out_channels: int,
) -> Tuple[Optional[nn.Module], bool]:
    """
    The neck's top block and where it reads from, checked against the pyramid.

    Args:
        top_block (str or nn.Module or None): a :data:`TOP_BLOCKS` name, None, or a module
            like Detectron2's ``LastLevelMaxPool``: attributes ``num_levels`` (int >= 1) and
            ``in_feature`` (a backbone feature or a pyramid level name).
        in_features (list[str]): backbone features fed to the neck, high to low resolution.
        input_shapes (dict[str, ShapeSpec]): the bottom-up backbone's output shapes.
        level_names (list[str]): the pyramid levels made from ``in_features``.
        out_channels (int): channels of the pyramid.

    Returns:
        nn.Module or None: the block.
        bool: True if it reads the backbone feature ``in_feature``, False if the pyramid level.
            A named block knows its source, even if the backbone also has an output of that
            name (e.g. an FPN used as bottom-up backbone); for a module, Detectron2's rule
            applies: a backbone feature of that name wins.
    """
    if isinstance(top_block, str):
        last = in_features[-1]
        block = build_top_block(
            top_block, last, input_shapes[last].channels, level_names[-1], out_channels
        )
        reads_backbone = top_block in _NAMED_TOP_BLOCKS and _NAMED_TOP_BLOCKS[top_block][0]
    else:
        block = top_block
        reads_backbone = getattr(block, "in_feature", None) in input_shapes
    if block is not None:
        _check_top_block(block, input_shapes, level_names, out_channels, reads_backbone)
    return block, reads_backbone


def _check_top_block(top_block, input_shapes, level_names, out_channels, reads_backbone):
    num_levels = getattr(top_block, "num_levels", None)
    in_feature = getattr(top_block, "in_feature", None)
    if not isinstance(num_levels, int) or num_levels < 1 or not isinstance(in_feature, str):
        raise ValueError(
            f"top_block {type(top_block).__name__} needs an int attribute num_levels >= 1 and "
            f"a str attribute in_feature; got num_levels={num_levels!r}, in_feature={in_feature!r}"
        )
    if reads_backbone:
        channels = input_shapes[in_feature].channels
    elif in_feature in level_names:
        channels = out_channels
    else:
        raise ValueError(
            f"top_block.in_feature={in_feature!r} is neither a bottom-up feature "
            f"{list(input_shapes)} nor a pyramid level {level_names}"
        )
    # Detectron2-style P6/P7 blocks: their first conv must take the input's channels.
    first_conv = getattr(top_block, "p6", None)
    if isinstance(first_conv, nn.Conv2d) and first_conv.in_channels != channels:
        raise ValueError(
            f"top_block.p6 takes {first_conv.in_channels} channels but its input "
            f"{in_feature!r} has {channels} (MODEL.FPN.OUT_CHANNELS or the backbone's channels)"
        )
