"""
The plugin's components in Detectron2's Python configs (LazyConfig).

Detectron2 describes a LazyConfig model as a tree of ``LazyCall`` nodes (its
``configs/common/models/mask_rcnn_fpn.py``, and the ``new_baselines`` recipes built on it).
:func:`with_plugin_components` takes such a Mask R-CNN tree and returns a copy in which the
plugin's components replace Detectron2's, every argument kept, and the plugin's own options
written out at the values that reproduce Detectron2:

- ``model.backbone``: Detectron2's ``FPN`` -> ``CustomFPN``, adding ``fuse_type="sum"``,
  ``upsample_mode="nearest"``, ``weighted_fusion_eps=1e-4``;
- ``model.proposal_generator``: ``RPN`` -> ``PerLevelRPN``, adding
  ``post_nms_topk_per_level=None``;
- ``model.proposal_generator.head``: ``StandardRPNHead`` -> ``PerLevelRPNHead``, adding
  ``shared=True``, ``norm=""``;
- ``model.roi_heads.mask_head``: ``MaskRCNNConvUpsampleHead`` -> ``ConvUpsampleMaskHead``,
  adding ``upsample_mode="deconv"``.

So a config file reuses a Detectron2 recipe as it is (data, optimizer, schedule, the rest of
the model) and only swaps the components; with the options above the model is Detectron2's,
parameter names and all, and a variant is one assignment (``model.backbone.fuse_type =
"weighted"``).

The result also holds plain data only (:func:`plain_data`): Detectron2's recipes put
``ShapeSpec`` objects and norm lambdas in their trees, which ``LazyConfig.save`` cannot write
as loadable YAML; they become ``LazyCall(ShapeSpec)`` nodes and the ``get_norm`` name that
builds the same layer.
"""
import copy
import logging
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from detectron2.config import LazyCall
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from .mask_head import ConvUpsampleMaskHead, MaskScoringHead, PANetMaskHead
from .neck import CustomFPN
from .rpn import PerLevelRPN, PerLevelRPNHead

__all__ = ["PLUGIN_COMPONENTS", "model_zoo_recipe", "with_plugin_components", "plain_data",
           "norm_name", "pyramid_level_shapes"]

logger = logging.getLogger(__name__)

# Node path in a GeneralizedRCNN tree -> (Detectron2's class there, the plugin's replacement,
# the plugin's own arguments at the values that reproduce Detectron2, the plugin's callables
# accepted there as they are, with their subclasses).
PLUGIN_COMPONENTS: Tuple[Tuple[str, type, Callable, Dict[str, Any], Tuple[Callable, ...]], ...] = (
    ("backbone", FPN, CustomFPN,
     {"fuse_type": "sum", "upsample_mode": "nearest", "weighted_fusion_eps": 1e-4},
     (CustomFPN,)),
    ("proposal_generator", RPN, PerLevelRPN, {"post_nms_topk_per_level": None}, (PerLevelRPN,)),
    ("proposal_generator.head", StandardRPNHead, PerLevelRPNHead,
     {"shared": True, "norm": ""}, (PerLevelRPNHead,)),
    ("roi_heads.mask_head", MaskRCNNConvUpsampleHead, ConvUpsampleMaskHead,
     {"upsample_mode": "deconv"}, (ConvUpsampleMaskHead, PANetMaskHead, MaskScoringHead)),
)
# Components a Mask R-CNN model must have (a mask head is optional: Faster R-CNN).
_REQUIRED = ("backbone", "proposal_generator", "proposal_generator.head")

# get_norm names probed by norm_name, in order of preference ("SyncBN" before "nnSyncBN").
_NORM_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "naiveSyncBN", "naiveSyncBN_N", "nnSyncBN")
# Channels the probe builds a norm layer with (GN needs a multiple of 32).
_PROBE_CHANNELS = 64


def _target(node) -> Any:
    """The callable a LazyCall node calls (a dotted-name string is located)."""
    target = node._target_
    if isinstance(target, str):
        try:
            return locate(target)
        except Exception:  # not importable: compared by name, so reported as it is
            return target
    return target


def _node_at(model: DictConfig, path: str) -> Optional[DictConfig]:
    node = model
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node or node[part] is None:
            return None
        node = node[part]
    return node if isinstance(node, DictConfig) and "_target_" in node else None


def _name(target) -> str:
    return getattr(target, "__qualname__", None) or str(target)


def with_plugin_components(model: DictConfig) -> DictConfig:
    """
    A copy of a Detectron2 Mask R-CNN LazyConfig model with the plugin's components in place
    of Detectron2's (see the module docstring for the table), made plain data by
    :func:`plain_data`.

    Args:
        model (DictConfig): a ``LazyCall(GeneralizedRCNN)`` tree whose backbone is an
            ``FPN``, proposal generator an ``RPN`` with a ``StandardRPNHead`` and mask head (if
            any) a ``MaskRCNNConvUpsampleHead``, e.g. ``model_zoo.get_config(
            "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py").model``. Nodes that already are
            the plugin's are kept, so calling it twice changes nothing.

    Returns:
        DictConfig: the new tree (``model`` itself is not modified).

    Raises:
        ValueError: a component is neither Detectron2's class the plugin replaces nor the
            plugin's (naming the node and both classes).
    """
    if not isinstance(model, DictConfig) or "_target_" not in model:
        raise ValueError(f"with_plugin_components needs a LazyCall model node, got "
                         f"{type(model).__name__}")
    model = copy.deepcopy(model)
    for path, builtin, plugin, options, accepted in PLUGIN_COMPONENTS:
        node = _node_at(model, path)
        if node is None:
            if path in _REQUIRED:
                raise ValueError(f"model.{path}: with_plugin_components needs a LazyCall node "
                                 f"there (Detectron2's {builtin.__name__})")
            continue
        target = _target(node)
        if target in accepted or (isinstance(target, type) and issubclass(
                target, tuple(a for a in accepted if isinstance(a, type)))):
            continue  # already the plugin's (a variant subclass too, e.g. PAFPN)
        if target is not builtin:
            raise ValueError(
                f"model.{path} calls {_name(target)}; with_plugin_components replaces "
                f"Detectron2's {builtin.__name__} by fpn_plugin's {_name(plugin)} and keeps "
                f"fpn_plugin's own classes ({', '.join(_name(a) for a in accepted)})")
        node._target_ = plugin
        for key, value in options.items():
            if key not in node:
                node[key] = value
    return plain_data(model)


def model_zoo_recipe(config_path: str) -> DictConfig:
    """
    A Detectron2 model-zoo LazyConfig recipe with the plugin's components: the config
    ``detectron2.model_zoo.get_config(config_path)`` returns (read from the installed
    Detectron2, not copied, by ``fpn_plugin.model_zoo.get_detectron2_config``), its ``model``
    passed through :func:`with_plugin_components`.

    Args:
        config_path (str): a model-zoo config path, e.g.
            ``"new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"``.

    Returns:
        DictConfig: ``dataloader``, ``lr_multiplier``, ``model``, ``optimizer``, ``train``
        (whatever the recipe defines), the model the plugin's.
    """
    from .model_zoo import get_detectron2_config

    if not config_path.endswith(".py"):
        raise ValueError(f"model_zoo_recipe reads LazyConfig (.py) recipes, got {config_path!r}")
    cfg = get_detectron2_config(config_path)
    cfg.model = with_plugin_components(cfg.model)
    return cfg


def pyramid_level_shapes(levels: Sequence[str], channels: int) -> Dict[str, ShapeSpec]:
    """
    ``{level: ShapeSpec(channels, stride)}`` of the neck's levels ``"p<stage>"`` (stride
    ``2**stage``, the neck's naming), in the given order: the ``input_shape`` of a head that
    reads feature maps itself, e.g. ``PANetMaskHead`` in a LazyConfig::

        mask_head=L(PANetMaskHead)(
            input_shape=L(pyramid_level_shapes)(levels="${...mask_in_features}", channels=256),
            ...)

    Raises:
        ValueError: a level not named "p<stage>", or channels not a positive int.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"pyramid_level_shapes: channels must be a positive int, got {channels!r}")
    shapes = {}
    for level in levels:
        match = re.fullmatch(r"p(\d+)", str(level))
        if match is None:
            raise ValueError(f"pyramid_level_shapes: {level!r} is not a pyramid level name "
                             "'p<stage>' (the neck's outputs, e.g. 'p2')")
        shapes[str(level)] = ShapeSpec(channels=channels, stride=2 ** int(match.group(1)))
    return shapes


def norm_name(norm: Callable[[int], nn.Module]) -> Optional[str]:
    """
    The :func:`detectron2.layers.get_norm` name that builds the same layer as ``norm``, a
    callable taking a channel count (e.g. the ``lambda c: NaiveSyncBatchNorm(c,
    stats_mode="N")`` of Detectron2's new baselines: ``"naiveSyncBN_N"``), or None.
    "The same" means the same class, parameters, buffers and settings (``extra_repr``,
    ``NaiveSyncBatchNorm``'s stats mode).
    """
    try:
        layer = norm(_PROBE_CHANNELS)
    except Exception:
        return None
    if not isinstance(layer, nn.Module):
        return None
    for name in _NORM_NAMES:
        try:
            candidate = get_norm(name, _PROBE_CHANNELS)
        except Exception:
            continue
        if _same_layer(layer, candidate):
            return name
    return None


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    if getattr(a, "_stats_mode", None) != getattr(b, "_stats_mode", None):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def plain_data(node):
    """
    ``node`` (changed in place and returned) with the objects Detectron2's recipes put in
    LazyConfig trees replaced by data ``LazyConfig.save`` writes as loadable YAML:

    - a ``ShapeSpec`` (an object on Detectron2 v0.6, a structured config on main) becomes
      ``LazyCall(ShapeSpec)(...)`` (the same object once instantiated);
    - a callable under a ``norm`` or ``conv_norm`` key becomes the ``get_norm`` name that
      builds the same layer (:func:`norm_name`); one with no such name is kept, with a warning
      (the config then works but saves as a pickle, as Detectron2's does).
    """
    _visit(node, "")
    return node


_SHAPE_SPEC_FIELDS = ("channels", "height", "width", "stride")


def _shape_spec_fields(value) -> Optional[Dict[str, Any]]:
    """
    The fields of a ``ShapeSpec`` in a config tree, or None if ``value`` is none: an object on
    Detectron2 v0.6 (a namedtuple), a typed ``DictConfig`` on main (a dataclass, which
    OmegaConf stores as a structured config that ``LazyConfig.save`` writes with a Python tag).
    """
    if isinstance(value, ShapeSpec):
        return {f: getattr(value, f) for f in _SHAPE_SPEC_FIELDS}
    if isinstance(value, DictConfig) and not value._is_none() and \
            OmegaConf.get_type(value) is ShapeSpec:
        return {f: value.get(f) for f in _SHAPE_SPEC_FIELDS}
    return None


def _visit(node, path: str) -> None:
    if isinstance(node, DictConfig):
        keys = list(node.keys())
    elif isinstance(node, ListConfig):
        keys = list(range(len(node)))
    else:
        return
    for key in keys:
        if OmegaConf.is_interpolation(node, key):  # "${..num_classes}" stays a reference
            continue
        value = node[key]
        where = f"{path}.{key}" if path else str(key)
        fields = _shape_spec_fields(value)
        if fields is not None:
            node[key] = LazyCall(ShapeSpec)(**{f: v for f, v in fields.items() if v is not None})
        elif key in ("norm", "conv_norm") and callable(value) and not isinstance(value, str):
            name = norm_name(value)
            if name is None:
                logger.warning(f"{where}: the norm callable {value!r} has no get_norm name; "
                               "LazyConfig.save will write this config as a pickle")
            else:
                node[key] = name
        elif key != "_target_":
            _visit(value, where)
