"""``add_fpn_plugin_config``: the plugin's config keys, added to a config the caller owns."""
from .data.config import add_data_config
from .engine.config import add_engine_config
from .inference.config import add_inference_config
from .mask_head.config import add_mask_head_config
from .neck.config import add_neck_config
from .rpn.config import add_rpn_config

__all__ = ["add_fpn_plugin_config"]

_COMPONENT_ADDERS = [add_neck_config, add_rpn_config, add_mask_head_config, add_data_config,
                     add_engine_config, add_inference_config]


def add_fpn_plugin_config(cfg):
    """
    Add every fpn_plugin config key, with its default, to ``cfg`` (in place).

    Call it on a fresh config (``get_cfg()``) before merging a YAML that uses plugin keys.
    Detectron2's global defaults are never edited, so configs built without this call are
    unaffected. Calling it twice on one config is harmless; on a frozen config it raises.

    Args:
        cfg (CfgNode): a Detectron2 config, e.g. from ``detectron2.config.get_cfg()``.
    """
    if cfg.is_frozen():
        raise ValueError("add_fpn_plugin_config: the config is frozen; call it before cfg.freeze()")
    # Adders write defaults into a scratch copy; only keys the config lacks are taken over, so
    # a second call never resets values the user already set.
    scratch = cfg.clone()
    for add in _COMPONENT_ADDERS:
        add(scratch)
    _add_missing(cfg, scratch)
    return cfg


def _add_missing(dst, src):
    for key, value in src.items():
        if key not in dst:
            dst[key] = value
        elif isinstance(value, type(dst)) and isinstance(dst[key], type(dst)):
            _add_missing(dst[key], value)
