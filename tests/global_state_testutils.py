"""Process-wide state a test may change by accident, captured so that the suite holds in any
order (tests/conftest.py checks it around every test; tests/test_package.py restores it after
re-importing the plugin).

What is captured: the plugin's modules in ``sys.modules``, every Detectron2/fpn_plugin
``Registry``'s entries, the Dataset/Metadata catalogs' names, environment variables, the
working directory, torch's thread count, default dtype, grad mode, determinism and matmul
precision flags, and the handlers/level/propagation of the loggers the code configures.
"""
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.registry import Registry

LOGGER_NAMES = ("", "detectron2", "fpn_plugin", "fvcore", "d2")
_MODULE_PREFIXES = ("fpn_plugin", "detectron2")
_PYTEST_ENV = ("PYTEST_CURRENT_TEST",)  # pytest rewrites it at every phase
# Set by library code the tests call, not by the tests: restored after each test, not reported.
# PYTHONHASHSEED: Detectron2's seed_all_rng (every training); KINETO_LOG_LEVEL: torch, when
# torch.profiler is first imported.
_LIBRARY_ENV = ("PYTHONHASHSEED", "KINETO_LOG_LEVEL")


def _plugin_modules() -> Dict[str, object]:
    return {n: m for n, m in sys.modules.items() if n == "fpn_plugin" or n.startswith("fpn_plugin.")}


def _registries() -> Dict[int, Registry]:
    """Every Registry held as a module attribute by a loaded detectron2/fpn_plugin module."""
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(_MODULE_PREFIXES):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Registry):
                found[id(value)] = value
    return found


def _torch_flags() -> Dict[str, object]:
    return {
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
    }


def _logger_state(name: str):
    log = logging.getLogger(name)
    # pytest's own capture handlers come and go around each test phase.
    handlers = [h for h in log.handlers if not type(h).__module__.startswith("_pytest")]
    return handlers, log.level, log.propagate


@dataclass
class GlobalState:
    modules: Dict[str, object]
    registries: Dict[int, Registry]
    registry_entries: Dict[int, Dict[str, object]]
    datasets: List[str]
    metadata: List[str]
    environ: Dict[str, str]
    cwd: str
    torch_flags: Dict[str, object]
    loggers: Dict[str, tuple] = field(default_factory=dict)
    loaded: frozenset = frozenset()

    def is_import_side_effect(self, obj) -> bool:
        """An object defined by a module first imported after this capture (a registry entry
        a lazily imported module adds is not a leak)."""
        return getattr(obj, "__module__", None) not in self.loaded


def capture() -> GlobalState:
    registries = _registries()
    return GlobalState(
        modules=_plugin_modules(),
        registries=registries,
        registry_entries={k: dict(r._obj_map) for k, r in registries.items()},
        datasets=sorted(DatasetCatalog.keys()),
        metadata=sorted(MetadataCatalog.keys()),
        environ={k: v for k, v in os.environ.items() if k not in _PYTEST_ENV},
        cwd=os.getcwd(),
        torch_flags=_torch_flags(),
        loggers={n: _logger_state(n) for n in LOGGER_NAMES},
        loaded=frozenset(sys.modules),
    )


def _dict_changes(what: str, before: Dict, after: Dict, show_values: bool = True) -> List[str]:
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        if key not in after:
            changes.append(f"{what}: {key!r} removed")
        elif key not in before:
            changes.append(f"{what}: {key!r} added" + (f" ({after[key]!r})" if show_values else ""))
        elif after[key] is not before[key] and after[key] != before[key]:
            changes.append(f"{what}: {key!r} changed" +
                           (f" ({before[key]!r} -> {after[key]!r})" if show_values else ""))
    return changes


def differences(before: GlobalState, after: GlobalState) -> List[str]:
    """What changed, one line each; modules imported for the first time are not a change."""
    changes = []
    for name, module in before.modules.items():
        if after.modules.get(name) is not module:
            changes.append(f"sys.modules: {name!r} removed or replaced (plugin re-imported?)")
    for key, registry in before.registries.items():
        now = dict(registry._obj_map)
        old = before.registry_entries[key]
        for name in sorted(set(old) | set(now)):
            if name not in old and before.is_import_side_effect(now[name]):
                continue
            if now.get(name) is not old.get(name):
                changes.append(f"registry {registry._name}: {name!r} "
                               f"{'added' if name not in old else 'removed' if name not in now else 'replaced'}")
    for what, old, new in (("DatasetCatalog", before.datasets, after.datasets),
                           ("MetadataCatalog", before.metadata, after.metadata)):
        changes += [f"{what}: {n!r} left registered" for n in sorted(set(new) - set(old))]
        changes += [f"{what}: {n!r} removed" for n in sorted(set(old) - set(new))]
    changes += _dict_changes("os.environ",
                             {k: v for k, v in before.environ.items() if k not in _LIBRARY_ENV},
                             {k: v for k, v in after.environ.items() if k not in _LIBRARY_ENV})
    if after.cwd != before.cwd:
        changes.append(f"working directory changed: {before.cwd} -> {after.cwd}")
    changes += _dict_changes("torch", before.torch_flags, after.torch_flags)
    for name, (handlers, level, propagate) in before.loggers.items():
        now_handlers, now_level, now_propagate = after.loggers[name]
        if now_handlers != handlers:
            changes.append(f"logger {name or 'root'!r}: handlers {handlers} -> {now_handlers}")
        if (now_level, now_propagate) != (level, propagate):
            changes.append(f"logger {name or 'root'!r}: level/propagate "
                           f"{(level, propagate)} -> {(now_level, now_propagate)}")
    return changes


def restore(state: GlobalState) -> None:
    """Puts everything :func:`capture` saw back (modules imported since are kept unless the
    plugin itself was re-imported, in which case its new modules go too)."""
    current = _plugin_modules()
    if any(current.get(n) is not m for n, m in state.modules.items()):
        for name in current:
            if name not in state.modules:
                del sys.modules[name]
    sys.modules.update(state.modules)
    for key, registry in state.registries.items():
        kept = {n: o for n, o in registry._obj_map.items() if state.is_import_side_effect(o)}
        registry._obj_map.clear()
        registry._obj_map.update(kept)
        registry._obj_map.update(state.registry_entries[key])
    for name in set(DatasetCatalog.keys()) - set(state.datasets):
        DatasetCatalog.remove(name)
    for name in set(MetadataCatalog.keys()) - set(state.metadata):
        MetadataCatalog.remove(name)
    for name in set(os.environ) - set(state.environ) - set(_PYTEST_ENV):
        del os.environ[name]
    os.environ.update(state.environ)
    os.chdir(state.cwd)
    flags = state.torch_flags
    torch.set_num_threads(flags["num_threads"])
    torch.set_default_dtype(flags["default_dtype"])
    torch.set_grad_enabled(flags["grad_enabled"])
    torch.use_deterministic_algorithms(flags["deterministic_algorithms"])
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn.deterministic"]
    for name, (handlers, level, propagate) in state.loggers.items():
        log = logging.getLogger(name)
        pytest_handlers = [h for h in log.handlers if type(h).__module__.startswith("_pytest")]
        log.handlers[:] = handlers + pytest_handlers
        log.setLevel(level)
        log.propagate = propagate
