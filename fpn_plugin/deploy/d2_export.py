"""
Detectron2's TorchScript export helpers on Detectron2 v0.6 and main: ``scripting_with_instances``,
``TracingAdapter``, ``patch_builtin_len``, ``freeze_training_mode``, ``patch_instances``,
``dump_torchscript_IR`` and ``torchscript_patch`` (the module, for
``patch_nonscriptable_classes``).

On Detectron2 main they come from ``detectron2.export``. v0.6's ``detectron2.export`` package
imports caffe2 (gone from modern torch) in its ``__init__``, but the three modules these
helpers live in (``torchscript.py``, ``torchscript_patch.py``, ``flatten.py``) import nothing
from caffe2: they are imported from the installed package's folder as submodules of a
stand-in package (:data:`STANDIN_PACKAGE`, whose ``__init__`` is never run), so their relative
imports resolve to each other. This is the one place the plugin does it; its deployment code
and tests import the helpers from here.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import detectron2

from .scripting import modules_kept_alive

__all__ = [
    "STANDIN_PACKAGE",
    "TracingAdapter",
    "dump_torchscript_IR",
    "export_module",
    "flatten_to_tuple",
    "freeze_training_mode",
    "patch_builtin_len",
    "patch_instances",
    "scripting_with_instances",
    "source",
    "torchscript_patch",
]

# The stand-in for v0.6's `detectron2.export` package (only its caffe2-free modules load).
STANDIN_PACKAGE = "_fpn_plugin_detectron2_export"
_MODULES = ("torchscript_patch", "torchscript", "flatten")


_PROBED = {}


def _detectron2_export_package():
    """``detectron2.export`` if it imports (Detectron2 main), else None (v0.6: caffe2); tried
    once per process."""
    if "package" not in _PROBED:
        try:
            _PROBED["package"] = importlib.import_module("detectron2.export")
        except ImportError:
            _PROBED["package"] = None
    return _PROBED["package"]


def _standin_package() -> types.ModuleType:
    package = sys.modules.get(STANDIN_PACKAGE)
    if package is None:
        folder = os.path.join(os.path.dirname(detectron2.__file__), "export")
        spec = importlib.machinery.ModuleSpec(STANDIN_PACKAGE, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [folder]  # submodules are found in Detectron2's own folder
        sys.modules[STANDIN_PACKAGE] = package
    return package


def export_module(name: str) -> types.ModuleType:
    """
    Detectron2's ``detectron2.export.<name>`` module, for ``name`` in ``torchscript_patch``,
    ``torchscript``, ``flatten``: the package's own on main, the stand-in's on v0.6.
    """
    if name not in _MODULES:
        raise ValueError(
            f"only Detectron2's caffe2-free export modules {_MODULES} load, got {name!r}"
        )
    if _detectron2_export_package() is not None:
        return importlib.import_module(f"detectron2.export.{name}")
    _standin_package()
    return importlib.import_module(f"{STANDIN_PACKAGE}.{name}")


def source() -> str:
    """Where the helpers come from: ``detectron2.export`` or the stand-in (for reports)."""
    if _detectron2_export_package() is not None:
        return "detectron2.export"
    return f"{STANDIN_PACKAGE} (Detectron2 {detectron2.__version__}'s export/*.py without caffe2)"


def torchscript_patch() -> types.ModuleType:
    """Detectron2's ``detectron2.export.torchscript_patch`` module."""
    return export_module("torchscript_patch")


def scripting_with_instances(model, fields):
    """Detectron2's :func:`detectron2.export.scripting_with_instances`, with every submodule of
    ``model`` kept alive meanwhile (:func:`fpn_plugin.deploy.scripting.modules_kept_alive`:
    torch's ``__prepare_scriptable__`` pass is otherwise nondeterministic)."""
    with modules_kept_alive(model):
        return export_module("torchscript").scripting_with_instances(model, fields)


def dump_torchscript_IR(model, folder):
    """Detectron2's :func:`detectron2.export.dump_torchscript_IR`."""
    return export_module("torchscript").dump_torchscript_IR(model, folder)


def patch_builtin_len(modules=()):
    """Detectron2's ``torchscript_patch.patch_builtin_len`` (a context manager)."""
    return torchscript_patch().patch_builtin_len(modules)


def patch_instances(fields):
    """Detectron2's ``torchscript_patch.patch_instances`` (a context manager)."""
    return torchscript_patch().patch_instances(fields)


def freeze_training_mode(model):
    """Detectron2's ``torchscript_patch.freeze_training_mode`` (a context manager)."""
    return torchscript_patch().freeze_training_mode(model)


def flatten_to_tuple(obj):
    """Detectron2's ``detectron2.export.flatten.flatten_to_tuple``."""
    return export_module("flatten").flatten_to_tuple(obj)


def __getattr__(name):
    # A class, looked up on use so that importing this module loads nothing of Detectron2's.
    if name == "TracingAdapter":
        return export_module("flatten").TracingAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
