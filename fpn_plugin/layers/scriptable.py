"""
The starting point of the plugin's ``__prepare_scriptable__`` methods (necks, mask-scoring
head), safe however the model is scripted (``torch.jit.script`` directly, Detectron2's
``scripting_with_instances``, or ``fpn_plugin.deploy``).

``torch.jit.script`` swaps every submodule for its ``__prepare_scriptable__`` result and
memoises the swap by ``id()`` of the module it swapped out, without keeping that module alive.
Two ways a module created later in the same pass could then take a freed address, hit the
memo and be replaced by an unrelated copy (seen: a conv of the mask-scoring head became the
neck, about one scripting in three):

- the swapped-out original is freed once its parent holds the copy: the copy keeps it;
- a deep copy's fresh submodules are visited, swapped for their own copies (Detectron2's
  patched ResNet inside a neck's ``bottom_up``) and freed: the copy shares the original's
  submodules instead, as scripting a plain module shares its parameters.
"""
import copy

from torch import nn

__all__ = ["prepared_copy"]


def prepared_copy(module: nn.Module) -> nn.Module:
    """
    A copy of ``module`` for its ``__prepare_scriptable__`` to rearrange: its own attributes and
    containers are new (deleting or adding children leaves ``module`` as it was), its children,
    parameters and buffers are ``module``'s, and it holds ``module`` (in a tuple, which torch
    neither prepares nor compiles) for as long as it lives.
    """
    shared = [child for child in module.children()]
    shared += [p for _, p in module.named_parameters(recurse=False)]
    shared += [b for _, b in module.named_buffers(recurse=False)]
    ret = copy.deepcopy(module, {id(obj): obj for obj in shared})
    ret.__dict__["_prepared_from"] = (module,)
    return ret
