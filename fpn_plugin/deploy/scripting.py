"""
``torch.jit.script`` for models whose submodules define ``__prepare_scriptable__`` (the
plugin's necks and mask-scoring head, Detectron2's patched ResNet), made deterministic.

``torch.jit.script`` first swaps every submodule for its ``__prepare_scriptable__`` copy and
memoises the swap by ``id()`` of the original, without keeping the original alive. Once a
parent drops a swapped-out original, CPython may give its address to a module created later in
the same pass (a later submodule's copy), which then hits the memo and is replaced by the
earlier copy: a conv of the mask-scoring head became the neck, and scripting failed in about
one run in three (the dependence on addresses made it look order-dependent). Holding a
reference to every original module for the duration of the call closes it.
"""
import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn

__all__ = ["modules_kept_alive", "script"]


@contextlib.contextmanager
def modules_kept_alive(module: nn.Module) -> Iterator[None]:
    """While the block runs, every submodule of ``module`` (as it is on entry) stays alive, so
    no module created inside the block can take an address (``id()``) one of them had."""
    kept = list(module.modules())
    try:
        yield
    finally:
        kept.clear()


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(module)`` inside :func:`modules_kept_alive`, without torch's
    deprecation notice. Like ``torch.jit.script``, it puts the ``__prepare_scriptable__``
    copies of submodules into their parents: script a ``copy.deepcopy`` to keep ``module``."""
    with modules_kept_alive(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        return torch.jit.script(module)
