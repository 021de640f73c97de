"""
TorchScript helpers shared by the component tests: Detectron2's ``torchscript_patch``
(``patch_instances``, ``freeze_training_mode``) and ``scripting_with_instances``, on v0.6 too,
from the plugin's one loader (``fpn_plugin.deploy.d2_export``: ``detectron2.export`` on main,
its caffe2-free modules loaded from their files on v0.6).
"""
import contextlib
import warnings

import torch

from fpn_plugin.deploy import d2_export, scripting


def torchscript_patch():
    """Detectron2's ``detectron2.export.torchscript_patch`` module."""
    return d2_export.torchscript_patch()


def scripting_with_instances(model, fields):
    """Detectron2's ``scripting_with_instances``: script ``model`` (training mode frozen) with
    ``Instances`` replaced by a scriptable class with ``fields`` (name -> type)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        return d2_export.scripting_with_instances(model, fields)


@contextlib.contextmanager
def scripted_with_instances(model, fields):
    """
    Like :func:`scripting_with_instances`, for modules that take ``Instances``: yields
    ``(scripted, to_scripted)``, where ``to_scripted(instances)`` converts Detectron2
    ``Instances`` to the scriptable class (valid inside the ``with`` block).
    """
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack.enter_context(d2_export.freeze_training_mode(model))
        new_instances = stack.enter_context(d2_export.patch_instances(fields))
        scripted = scripting.script(model)
        yield scripted, new_instances.from_instances


def script(module):
    """``torch.jit.script`` without its deprecation warning, deterministic for modules with
    ``__prepare_scriptable__`` (:func:`fpn_plugin.deploy.scripting.script`)."""
    return scripting.script(module)


def trace(module, inputs):
    """``torch.jit.trace`` (non-strict: list/dict outputs) without the tracer's warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, inputs, strict=False)
