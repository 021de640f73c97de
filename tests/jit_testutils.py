"""
TorchScript helpers shared by the component tests: Detectron2's ``torchscript_patch``
(``patch_instances``, ``freeze_training_mode``) and ``scripting_with_instances``, on v0.6 too.

v0.6's ``detectron2.export`` package imports caffe2 (gone from modern torch), so there the
module ``export/torchscript_patch.py`` (which imports nothing from caffe2) is loaded from its
file; on Detectron2 main the package imports and its own module is used.
"""
import contextlib
import importlib.util
import os
import sys
import warnings

import detectron2
import torch


def torchscript_patch():
    """Detectron2's ``detectron2.export.torchscript_patch`` module."""
    try:
        from detectron2.export import torchscript_patch as patch

        return patch
    except ImportError:
        pass
    name = "_fpn_plugin_d2_torchscript_patch"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(detectron2.__file__), "export", "torchscript_patch.py")
    spec = importlib.util.spec_from_file_location(name, path)
    patch = importlib.util.module_from_spec(spec)
    sys.modules[name] = patch  # patch_instances looks itself up there
    spec.loader.exec_module(patch)
    return patch


def scripting_with_instances(model, fields):
    """Detectron2's ``scripting_with_instances``: script ``model`` (training mode frozen) with
    ``Instances`` replaced by a scriptable class with ``fields`` (name -> type)."""
    patch = torchscript_patch()
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        stack.enter_context(patch.freeze_training_mode(model))
        stack.enter_context(patch.patch_instances(fields))
        return torch.jit.script(model)


@contextlib.contextmanager
def scripted_with_instances(model, fields):
    """
    Like :func:`scripting_with_instances`, for modules that take ``Instances``: yields
    ``(scripted, to_scripted)``, where ``to_scripted(instances)`` converts Detectron2
    ``Instances`` to the scriptable class (valid inside the ``with`` block).
    """
    patch = torchscript_patch()
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack.enter_context(patch.freeze_training_mode(model))
        new_instances = stack.enter_context(patch.patch_instances(fields))
        scripted = torch.jit.script(model)
        yield scripted, new_instances.from_instances


def script(module):
    """``torch.jit.script`` without its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(module)


def trace(module, inputs):
    """``torch.jit.trace`` (non-strict: list/dict outputs) without the tracer's warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, inputs, strict=False)
