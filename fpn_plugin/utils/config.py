"""The one check that a config went through ``add_fpn_plugin_config``, and the one way to add
default keys without resetting the values a config has."""
from typing import Callable, Iterator

__all__ = ["add_missing_keys", "require_plugin_keys"]


def add_missing_keys(dst, src) -> None:
    """Copy into the config node ``dst`` the keys of ``src`` it lacks, recursively; the values
    ``dst`` already has are kept."""
    for key, value in src.items():
        if key not in dst:
            dst[key] = value
        elif isinstance(value, type(dst)) and isinstance(dst[key], type(dst)):
            add_missing_keys(dst[key], value)


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
