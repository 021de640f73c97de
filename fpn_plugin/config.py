"""``add_fpn_plugin_config``: the plugin's config keys, added to a config the caller owns."""
import os
from typing import Sequence

from .data.config import add_data_config, add_shapes_config, names_shapes_dataset
from .engine.config import add_engine_config
from .inference.config import add_inference_config
from .mask_head.config import add_mask_head_config
from .neck.config import add_neck_config
from .rpn.config import add_rpn_config
from .utils.config import add_missing_keys, with_missing_keys

__all__ = ["add_fpn_plugin_config", "add_shapes_config", "load_config", "uses_shapes_dataset",
           "with_plugin_defaults"]

_COMPONENT_ADDERS = [add_neck_config, add_rpn_config, add_mask_head_config, add_data_config,
                     add_engine_config, add_inference_config]


def add_fpn_plugin_config(cfg):
    """
    Add every fpn_plugin config key, with its default, to ``cfg`` (in place).

    Call it on a fresh config (``get_cfg()``) before merging a YAML that uses plugin keys.
    The embedded shapes dataset's keys (``DATASETS.SHAPES.*``) are not among them:
    ``add_shapes_config(cfg)`` adds those, and ``load_config`` does so for a config that
    uses that dataset.
    Detectron2's global defaults are never edited, so configs built without this call are
    unaffected. Calling it twice on one config is harmless; on a frozen config it raises.

    Args:
        cfg (CfgNode): a Detectron2 config, e.g. from ``detectron2.config.get_cfg()``.
    """
    if cfg.is_frozen():
        raise ValueError("add_fpn_plugin_config: the config is frozen; call it before cfg.freeze()")
    # Only keys the config lacks are taken over, so a second call never resets values the user
    # already set.
    return add_missing_keys(cfg, _COMPONENT_ADDERS)


def with_plugin_defaults(cfg):
    """
    ``cfg`` if it has every fpn_plugin key, else a copy with the missing keys at their defaults
    (frozen if ``cfg`` is). This is how the plugin's trainer, export and dataset helpers treat
    a config built without ``add_fpn_plugin_config``: every default reproduces Detectron2, so a
    plain Detectron2 config behaves as Detectron2 would.
    """
    return with_missing_keys(cfg, _COMPONENT_ADDERS)


def load_config(config_file: str, opts: Sequence[str] = (), *, freeze: bool = True):
    """
    The config of the plugin's command-line entries: Detectron2's defaults, the plugin's keys
    (and the shapes dataset's where the config uses it: ``uses_shapes_dataset``),
    ``config_file`` and the trailing ``KEY VALUE`` overrides ``opts``.

    The file is read by :func:`fpn_plugin.io.merge_config_file`: plain YAML only (a Python
    tag is refused naming the file and line, never run) and ``_BASE_`` local files or
    ``model_zoo://`` names only (nothing downloaded).

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ConfigFileError (a ValueError): the file or one of its bases is not plain YAML, or a
            ``_BASE_`` cannot be followed (naming the file).
        ValueError: an unknown key, a value of the wrong type, or an odd number of overrides
            (the message names the file, the overrides and the key).
    """
    from detectron2.config import get_cfg

    from .io.config_files import ConfigFileError, merge_config_file

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file!r}")
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    if uses_shapes_dataset(config_file, opts):
        add_shapes_config(cfg)
    try:
        merge_config_file(cfg, config_file)
        cfg.merge_from_list(list(opts))
    except ConfigFileError:
        raise
    except (KeyError, AssertionError, ValueError, TypeError, SyntaxError) as e:
        # yacs: unknown key (KeyError), odd number of overrides (AssertionError), type mismatch
        raise ValueError(f"bad config ({config_file}, overrides {list(opts)}): {e}") from e
    except Exception as e:  # a YAML that does not parse
        raise ValueError(f"config file {config_file!r} cannot be read: {e}") from e
    if freeze:
        cfg.freeze()
    return cfg


def uses_shapes_dataset(config_file: str, opts: Sequence[str] = ()) -> bool:
    """
    Whether the YAML ``config_file`` (its ``_BASE_`` files included) or the overrides ``opts``
    name a ``shapes_*`` dataset or set ``DATASETS.SHAPES``: the configs that get the shapes
    dataset's keys (``add_shapes_config``). False for a file that cannot be read as plain YAML
    (merging it reports why).
    """
    from detectron2.config import CfgNode

    try:
        content = CfgNode.load_yaml_with_base(config_file, allow_unsafe=False)
    except Exception:
        content = {}
    return names_shapes_dataset(content if isinstance(content, dict) else {}, opts)
