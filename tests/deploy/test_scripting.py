"""
``fpn_plugin.deploy.scripting``: scripting a model whose submodules return copies from
``__prepare_scriptable__`` is deterministic. torch memoises those swaps by ``id()`` without
keeping the originals alive, so a module created later in the pass could take a freed
original's address and be replaced by another module's copy (plain ``torch.jit.script`` on
:class:`_Parent` got a wrong model or failed in about half the tries here, 2026-12-07).
Guarded twice: the plugin's scripting entries keep every module alive, and the plugin's own
``__prepare_scriptable__`` copies (:func:`fpn_plugin.layers.prepared_copy`) hold their
originals and share their children, so plain ``torch.jit.script`` is safe on them too.
"""
import copy
import warnings
import weakref

import torch
from torch import nn

from fpn_plugin.deploy import scripting
from fpn_plugin.layers import prepared_copy


class _Copying(nn.Module):
    """Prepares a fresh copy, as the plugin's necks and mask-scoring head (and Detectron2's
    patched ResNet) do."""

    def __init__(self, scale: float):
        super().__init__()
        self.inner = nn.Conv2d(1, 1, 1)
        self.scale = scale

    def forward(self, x):
        return self.inner(x) * self.scale

    def __prepare_scriptable__(self):
        return copy.deepcopy(self)


class _Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = _Copying(2.0)
        self.second = _Copying(3.0)

    def forward(self, x):
        return self.first(x) + self.second(x)


def test_script_keeps_every_submodule_in_place_every_time():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    for _ in range(40):  # the unguarded pass went wrong about every other time
        model = _Parent()
        want = model(x)
        scripted = scripting.script(copy.deepcopy(model))
        assert torch.equal(scripted(x), want)
        assert scripted.second.inner.original_name == "Conv2d"


def test_modules_kept_alive_holds_dropped_modules_only_inside_the_block():
    model = _Parent()
    first = weakref.ref(model.first)
    with scripting.modules_kept_alive(model):
        del model.first  # what torch does when it swaps in the prepared copy
        assert first() is not None
    assert first() is None


class _PreparedCopying(_Copying):
    """Prepares with the plugin's :func:`fpn_plugin.layers.prepared_copy`."""

    def __prepare_scriptable__(self):
        return prepared_copy(self)


class _PreparedParent(_Parent):
    def __init__(self):
        nn.Module.__init__(self)
        self.first = _PreparedCopying(2.0)
        self.second = _PreparedCopying(3.0)


def test_prepared_copies_script_deterministically_even_with_plain_torch_jit_script():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    for _ in range(40):
        model = _PreparedParent()
        want = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            scripted = torch.jit.script(copy.deepcopy(model))
        assert torch.equal(scripted(x), want)


def test_prepared_copy_shares_children_and_holds_the_original():
    model = _PreparedCopying(2.0)
    model.register_buffer("count", torch.zeros(1))
    ret = prepared_copy(model)
    assert ret is not model and ret.inner is model.inner and ret.count is model.count
    del ret.inner
    assert hasattr(model, "inner")  # the copy's containers are its own
    original = weakref.ref(model)
    del model
    assert original() is not None  # held by the copy while it lives
    del ret
    assert original() is None
