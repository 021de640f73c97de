"""
LazyConfig files saved as YAML, read as data.

A ``.py`` LazyConfig is a program: loading it runs it, like any Python file you run, so only
run ``.py`` configs you trust. A ``.yaml`` LazyConfig (what ``LazyConfig.save`` writes) is
data, but Detectron2 reads it with ``yaml.unsafe_load`` and later calls whatever each
``_target_`` names: ``_target_: subprocess.call`` would run a command. Before Detectron2 sees
such a file, :func:`check_lazy_yaml` parses it with ``yaml.safe_load`` (Python tags refused,
naming the file and line) and checks every ``_target_`` against an allow-list of module
prefixes (:data:`DEFAULT_TARGET_PREFIXES` plus what the user adds explicitly, e.g.
``lazy_train_net.py --allow-target-prefix mypackage``). A few callables under those prefixes
that fetch or unpickle code (:data:`REFUSED_TARGETS`) are refused even so.
"""
from typing import Any, Iterable, List, Tuple

from .config_files import ConfigFileError, safe_load_yaml_file

__all__ = ["DEFAULT_TARGET_PREFIXES", "REFUSED_TARGETS", "LazyTargetError", "check_lazy_yaml",
           "check_target_prefixes"]

DEFAULT_TARGET_PREFIXES = ("detectron2", "fpn_plugin", "torch", "torchvision", "fvcore")
# Under the allowed prefixes, yet they download or unpickle (and so can run) code.
REFUSED_TARGETS = ("torch.hub", "torch.load", "torch.jit.load", "torch.package",
                   "torch.utils.cpp_extension", "detectron2.model_zoo", "fvcore.common.download")
# Deeper than any real config; a hostile file nested deeper is refused, not recursed into.
_MAX_DEPTH = 100


class LazyTargetError(ConfigFileError):
    """A ``_target_`` of a YAML LazyConfig outside the allowed module prefixes."""


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_target_prefixes(prefixes: Iterable[str]) -> Tuple[str, ...]:
    """Validate user-given prefixes (dotted module names, e.g. ``mypackage.models``)."""
    out = []
    for p in prefixes:
        parts = str(p).split(".")
        if not p or not all(part.isidentifier() for part in parts):
            raise ValueError(f"--allow-target-prefix {p!r} is not a dotted module name "
                             "(e.g. mypackage.models)")
        out.append(str(p))
    return tuple(out)


def _targets(node: Any, path: str, depth: int, found: List[Tuple[str, Any]], file: str) -> None:
    if depth > _MAX_DEPTH:
        raise ConfigFileError(f"config file {file!r}: nested deeper than {_MAX_DEPTH} levels "
                              f"at {path or '<root>'}")
    if isinstance(node, dict):
        for key, value in node.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                found.append((key_path, value))
            else:
                _targets(value, key_path, depth + 1, found, file)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _targets(value, f"{path}[{i}]", depth + 1, found, file)


def check_lazy_yaml(path: str, allow_target_prefixes: Iterable[str] = ()) -> dict:
    """
    Refuse a YAML LazyConfig that is not plain data or names a callable outside the allowed
    prefixes; return its parsed content.

    Args:
        path (str): the ``.yaml`` LazyConfig.
        allow_target_prefixes: module prefixes allowed besides :data:`DEFAULT_TARGET_PREFIXES`.

    Raises:
        ConfigFileError: missing, not YAML, a Python tag (file and line named).
        LazyTargetError: a ``_target_`` outside the allow-list (file and key path named).
    """
    allowed = DEFAULT_TARGET_PREFIXES + check_target_prefixes(allow_target_prefixes)
    data = safe_load_yaml_file(path, "LazyConfig file")
    if not isinstance(data, dict):
        raise ConfigFileError(f"LazyConfig file {path!r} holds a {type(data).__name__}, not a "
                              "mapping")
    found: List[Tuple[str, Any]] = []
    _targets(data, "", 0, found, path)
    for key_path, target in found:
        if not isinstance(target, str) or not target:
            raise LazyTargetError(f"LazyConfig file {path!r}: {key_path} is {target!r}, not a "
                                  "dotted name")
        user_allowed = any(_under(target, p) for p in allowed[len(DEFAULT_TARGET_PREFIXES):])
        if any(_under(target, r) for r in REFUSED_TARGETS) and not user_allowed:
            raise LazyTargetError(
                f"LazyConfig file {path!r}: {key_path} = {target!r} can fetch or unpickle code, "
                "so a YAML config may not call it")
        if not any(_under(target, p) for p in allowed):
            raise LazyTargetError(
                f"LazyConfig file {path!r}: {key_path} = {target!r} is not under the allowed "
                f"module prefixes {list(allowed)}; a YAML config is data and may only build "
                "components of these packages (add one with --allow-target-prefix PREFIX if "
                "you trust it, or use a .py config, which is code by design)")
    return data
