"""
YAML configs (Detectron2's ``CfgNode`` format) read as data only.

Detectron2's ``CfgNode.merge_from_file`` retries a file that ``yaml.safe_load`` refuses with
``yaml.unsafe_load``, where a tag such as ``!!python/object/apply:os.system`` runs a command,
and follows a ``_BASE_`` that is an ``http(s)://`` address. Here the file and each of its
bases are parsed with ``yaml.safe_load`` only; a Python tag is a :class:`ConfigFileError`
naming the file and the line. ``_BASE_`` may name:

- a local file, relative to the file that names it (or absolute, or ``~/...``);
- a Detectron2 model-zoo config as ``model_zoo://<name>.yaml`` (resolved to the installed
  copy with ``detectron2.model_zoo.get_config_file``; no download).

Anything with ``://`` otherwise (``http://``, ``https://``, ``s3://``...) is refused, as are
chains deeper than :data:`MAX_BASE_DEPTH` and a base that includes itself (a cycle).

The merged dictionary then enters the config the way ``merge_from_file`` would put it there
(same version handling, same unknown-key and type checks), so results are unchanged for
every plain config.
"""
import logging
import os
from typing import Any, Dict, List, Optional

import yaml

__all__ = ["MAX_BASE_DEPTH", "MODEL_ZOO_PREFIX", "ConfigFileError", "merge_config_file",
           "read_yaml_config", "safe_load_yaml_file"]

logger = logging.getLogger(__name__)

MAX_BASE_DEPTH = 16
MODEL_ZOO_PREFIX = "model_zoo://"


class ConfigFileError(ValueError):
    """A config file that is missing, not plain YAML, or whose ``_BASE_`` cannot be followed."""


def safe_load_yaml_file(path: str, what: str = "config file") -> Any:
    """
    ``yaml.safe_load`` of ``path``; errors name the file (and the line of a refused tag).

    Raises:
        ConfigFileError: missing, unreadable, not YAML, or holding a Python (or other
            non-standard) tag.
    """
    if not os.path.isfile(path):
        raise ConfigFileError(f"{what} not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(
            f"{what} {path!r}{line} is not plain YAML ({e.problem or 'a tag'}): a Python tag "
            "could run code when loaded (Detectron2 would fall back to yaml.unsafe_load), so "
            "the file is refused") from e
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigFileError(f"{what} {path!r} is not valid YAML: {first}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{what} {path!r} cannot be read: {e}") from e
    except RecursionError as e:
        raise ConfigFileError(f"{what} {path!r} is nested too deeply to read") from e


def _resolve_base(base: Any, including: str) -> str:
    if not isinstance(base, str) or not base:
        raise ConfigFileError(f"config file {including!r}: _BASE_ must be a file name, got "
                              f"{base!r}")
    if base.startswith(MODEL_ZOO_PREFIX):
        from detectron2 import model_zoo

        name = base[len(MODEL_ZOO_PREFIX):]
        try:
            return model_zoo.get_config_file(name)
        except RuntimeError as e:
            raise ConfigFileError(f"config file {including!r}: _BASE_ {base!r} is not a "
                                  f"Detectron2 model-zoo config ({e})") from e
    if "://" in base:
        raise ConfigFileError(
            f"config file {including!r}: _BASE_ {base!r} is not a local file; only local files "
            f"and model-zoo names ({MODEL_ZOO_PREFIX}<name>.yaml) are followed (nothing is "
            "downloaded)")
    base = os.path.expanduser(base)
    if not os.path.isabs(base):
        base = os.path.join(os.path.dirname(including), base)
    return os.path.normpath(base)


def _merge_into(src: Dict[str, Any], dst: Dict[str, Any], path: str, prefix: str = "") -> None:
    """``src`` over ``dst`` (in place); nested mappings merge, other values replace."""
    for key, value in src.items():
        if isinstance(value, dict) and key in dst:
            if not isinstance(dst[key], dict):
                raise ConfigFileError(f"config file {path!r}: {prefix}{key} is a mapping here "
                                      "but not in its _BASE_")
            _merge_into(value, dst[key], path, f"{prefix}{key}.")
        else:
            dst[key] = value


def read_yaml_config(path: str, _chain: Optional[List[str]] = None) -> Dict[str, Any]:
    """
    The dictionary of a YAML config with its ``_BASE_`` chain merged in (the file's values
    over its base's), read with ``yaml.safe_load`` only.

    Raises:
        ConfigFileError: see the module docstring; the message names the file.
    """
    chain = list(_chain or [])
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigFileError(f"config file {path!r}: _BASE_ cycle ("
                              + " -> ".join(chain + [real]) + ")")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigFileError(f"config file {path!r}: _BASE_ chain deeper than "
                              f"{MAX_BASE_DEPTH} files")
    data = safe_load_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path!r} holds a {type(data).__name__}, not a "
                              "mapping of config keys")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigFileError(f"config file {path!r}: key {bad_keys[0]!r} is not a string")
    if "_BASE_" not in data:
        return data
    base_file = _resolve_base(data.pop("_BASE_"), path)
    merged = read_yaml_config(base_file, chain + [real])
    _merge_into(data, merged, path)
    return merged


def merge_config_file(cfg, path: str) -> None:
    """
    Merge the YAML config ``path`` (see :func:`read_yaml_config`) into the Detectron2
    ``CfgNode`` ``cfg`` (in place), as ``cfg.merge_from_file(path)`` would for a plain file:
    the same version upgrade for old configs and the same unknown-key and type checks.

    Raises:
        ConfigFileError: the file cannot be read safely.
        KeyError, ValueError: an unknown key or a value of the wrong type (yacs's checks).
    """
    from detectron2.config import compat

    loaded = type(cfg)(read_yaml_config(path))
    version = loaded.get("VERSION", None)
    if version is None:
        version = compat.guess_version(loaded, path)
    if version > cfg.VERSION:
        raise ConfigFileError(f"config file {path!r} is of config VERSION {version}, newer than "
                              f"this Detectron2's {cfg.VERSION}")
    if version == cfg.VERSION:
        cfg.merge_from_other_cfg(loaded)
        return
    logger.warning(f"Config file {path!r} is of the old config VERSION {version}; upgrading it "
                   f"to {cfg.VERSION} as Detectron2 does")
    old = compat.downgrade_config(cfg, to_version=version)
    old.merge_from_other_cfg(loaded)
    upgraded = compat.upgrade_config(old)
    cfg.clear()
    cfg.update(upgraded)
