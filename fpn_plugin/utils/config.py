"""The one check that a config went through ``add_fpn_plugin_config``, and the one way keys
are added with their defaults."""
from typing import Callable, Iterable, Iterator

__all__ = ["add_missing_keys", "require_plugin_keys", "with_missing_keys"]


def _copy_missing(dst, src) -> None:
    for key, value in src.items():
        if key not in dst:
            dst[key] = value
        elif isinstance(value, type(dst)) and isinstance(dst[key], type(dst)):
            _copy_missing(dst[key], value)


def add_missing_keys(cfg, adders: Iterable[Callable]):
    """
    Add to ``cfg`` (in place, not frozen) the keys that the config adders ``adders`` add and it
    lacks, with their defaults. The adders run on a scratch copy, so values the config already
    has are never reset (calling it twice is harmless). Returns ``cfg``.
    """
    scratch = cfg.clone()
    for add in adders:
        add(scratch)
    _copy_missing(cfg, scratch)
    return cfg


def with_missing_keys(cfg, adders: Iterable[Callable]):
    """``cfg`` if it has every key ``adders`` add, else a copy with the missing ones at their
    defaults (frozen if ``cfg`` is)."""
    full = cfg.clone()
    full.defrost()
    add_missing_keys(full, adders)
    if full == cfg:
        return cfg
    if cfg.is_frozen():
        full.freeze()
    return full


def _missing_keys(cfg, complete, prefix: str = "") -> Iterator[str]:
    for key, value in complete.items():
        if key not in cfg:
            yield prefix + key
        elif isinstance(value, type(complete)) and isinstance(cfg[key], type(cfg)):
            yield from _missing_keys(cfg[key], value, prefix + key + ".")


def require_plugin_keys(cfg, add_keys: Callable, component: str) -> None:
    """
    Raise unless ``cfg`` has every key that ``add_keys`` (a component's config adder, e.g.
    ``add_neck_config``) adds, so that a component built from a config without the plugin's
    keys says what to call instead of failing on the first missing attribute.

    Args:
        cfg (CfgNode): the config a component is built from.
        add_keys (callable): the component's adder, called on a scratch copy of ``cfg``.
        component (str): the component's name, for the message.

    Raises:
        ValueError: naming the missing keys and ``fpn_plugin.add_fpn_plugin_config``.
    """
    complete = cfg.clone()
    complete.defrost()
    add_keys(complete)
    missing = sorted(_missing_keys(cfg, complete))
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ValueError(
            f"{component}: the config has no {shown}; call "
            "fpn_plugin.add_fpn_plugin_config(cfg) before merging the config file"
        )
