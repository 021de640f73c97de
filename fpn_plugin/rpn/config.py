"""
Config keys of fpn_plugin.rpn (added to ``cfg.MODEL.RPN``, next to Detectron2's own), the
one helper that broadcasts a value to the levels, and the anchor keys' check.

Every default reproduces Detectron2's RPN + StandardRPNHead. Detectron2's keys keep their
meaning: ``CONV_DIMS`` (one entry per 3x3 conv of the head, so its length is the head's
depth; -1 = input channels), ``PRE_NMS_TOPK_*`` (per level), ``POST_NMS_TOPK_*`` (per image),
``NMS_THRESH``; ``ANCHOR_GENERATOR.SIZES`` / ``ASPECT_RATIOS`` accept one list per level, which
may now differ in length between levels (a different number of anchors per level).

Why separate ``*_PER_LEVEL`` keys: yacs refuses to merge a list into a key whose default is
an int, and changing the type of Detectron2's ``PRE/POST_NMS_TOPK_*`` keys would break the
built-in RPN, which reads them as ints. So the int keys stay as they are and an empty
``*_PER_LEVEL`` list means "use the int key"; a non-empty one gives one value per level.
"""
import collections.abc
from typing import List

from detectron2.modeling.anchor_generator import build_anchor_generator

__all__ = [
    "add_rpn_config",
    "POST_NMS_TOPK_MODES",
    "per_level_ints",
    "check_anchor_keys",
    "anchor_generator_from_config",
]

POST_NMS_TOPK_MODES = ("per_image", "per_level")


def add_rpn_config(cfg):
    """Add fpn_plugin.rpn's keys to ``cfg.MODEL.RPN`` (in place)."""
    rpn = cfg.MODEL.RPN
    # True: one head (3x3 convs + 1x1 predictors) applied to every level with the same
    # weights (the FPN paper; needs equal channels on all levels). False: a separate head,
    # with its own weights, per level of IN_FEATURES.
    rpn.SHARED_HEAD = True
    # Normalization after each 3x3 conv of the head: "" (none, Detectron2), "GN", "BN",
    # "SyncBN", "FrozenBN", ... (any name detectron2.layers.get_norm accepts). With a shared
    # head one norm layer is shared by all levels; batch statistics are then per level call.
    rpn.HEAD_NORM = ""
    # Pre-NMS top-k per level as a list of len(IN_FEATURES) ints; [] = PRE_NMS_TOPK_TRAIN
    # (resp. _TEST) on every level.
    rpn.PRE_NMS_TOPK_TRAIN_PER_LEVEL = []
    rpn.PRE_NMS_TOPK_TEST_PER_LEVEL = []
    # Where the post-NMS top-k applies:
    #   "per_image" (Detectron2): the POST_NMS_TOPK_TRAIN/_TEST best proposals of each image,
    #       over all levels merged;
    #   "per_level": the best POST_NMS_TOPK_*_PER_LEVEL[i] (or POST_NMS_TOPK_* when that list
    #       is empty) of each level i of each image; the image gets their union.
    rpn.POST_NMS_TOPK_MODE = "per_image"
    # Post-NMS top-k per level (POST_NMS_TOPK_MODE "per_level" only); [] = POST_NMS_TOPK_TRAIN
    # (resp. _TEST) on every level.
    rpn.POST_NMS_TOPK_TRAIN_PER_LEVEL = []
    rpn.POST_NMS_TOPK_TEST_PER_LEVEL = []
    # True: inference proposals also carry `proposal_levels` (int64, index into IN_FEATURES).
    # False (default): Detectron2's fields only, so the model scripts with Detectron2's field
    # list; to script with levels use fpn_plugin.deploy.plugin_fields() (see docs/deploy.md).
    rpn.RECORD_PROPOSAL_LEVELS = False


def per_level_ints(value, num_levels: int, key: str) -> List[int]:
    """
    One positive int per level: the one place that broadcasts a value to the levels.

    Args:
        value (int or list[int]): an int used on every level, or ``num_levels`` ints.
        num_levels (int): number of levels (len of MODEL.RPN.IN_FEATURES).
        key (str): the config key that sets ``value``, named in errors.

    Returns:
        list[int]: ``num_levels`` positive ints.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        values = [value] * num_levels
    elif isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != num_levels:
            raise ValueError(
                f"{key} has {len(values)} entries {values} but there are {num_levels} levels "
                "(MODEL.RPN.IN_FEATURES); give one value per level"
            )
    else:
        raise ValueError(f"{key} must be an int or a list of ints (one per level), got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"{key} must hold positive ints, got {value!r}")
    return values


def _broadcast_len(value, key: str) -> int:
    """Number of per-level entries of an anchor parameter (1 means one for all levels)."""
    if not isinstance(value, collections.abc.Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty list (of lists) of numbers, got {value!r}")
    if not isinstance(value[0], collections.abc.Sequence):
        return 1  # a flat list of numbers is used on every level
    for entry in value:
        if not isinstance(entry, collections.abc.Sequence) or not entry:
            raise ValueError(f"{key} entries must be non-empty lists of numbers, got {value!r}")
    return len(value)


def check_anchor_keys(cfg, num_levels: int) -> None:
    """
    Raise ``ValueError`` unless MODEL.ANCHOR_GENERATOR.SIZES and ASPECT_RATIOS give one entry
    per level of MODEL.RPN.IN_FEATURES (``num_levels``), or one for all: Detectron2's
    broadcast rule, which its anchor generator only asserts.
    """
    in_features = list(cfg.MODEL.RPN.IN_FEATURES)
    for key, value in (
        ("MODEL.ANCHOR_GENERATOR.SIZES", cfg.MODEL.ANCHOR_GENERATOR.SIZES),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS),
    ):
        n = _broadcast_len(value, key)
        if n not in (1, num_levels):
            raise ValueError(
                f"{key} = {list(value)} has {n} per-level lists but MODEL.RPN.IN_FEATURES "
                f"{in_features} has {num_levels} levels; give {num_levels} lists or one "
                "list used on every level"
            )


def anchor_generator_from_config(cfg, input_shape):
    """
    Detectron2's anchor generator for ``input_shape`` (one ShapeSpec per level of
    MODEL.RPN.IN_FEATURES), once :func:`check_anchor_keys` has passed.
    """
    check_anchor_keys(cfg, len(input_shape))
    return build_anchor_generator(cfg, input_shape)
