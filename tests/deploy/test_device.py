"""
A traced proposal selection carries no device of its own: every index tensor it creates is
moved to the device of its input inside the graph (as Detectron2 main does for its own
selection), so a model traced on one device runs on another. CPU: the traced graph is
inspected; CUDA (skipped without it): traced on one device, run on the other.
"""
import warnings

import pytest
import torch

from fpn_plugin.rpn.postprocess import find_top_proposals_per_level

# Operators that create a tensor from nothing (so with a device taken at trace time).
FACTORIES = {"aten::arange", "aten::full", "aten::zeros", "aten::ones", "aten::empty",
             "aten::tensor", "aten::scalar_tensor", "aten::eye", "aten::linspace"}


def _moves_to_an_input_device(node) -> bool:
    """``aten::to`` whose device comes from a tensor of the graph (``prim::device`` or the
    ``to(other)`` overload), not from a constant."""
    if node.kind() != "aten::to":
        return False
    rest = list(node.inputs())[1:]
    return any(v.node().kind() == "prim::device"
               or (v.node().kind() != "prim::Constant" and v.type().kind() == "TensorType")
               for v in rest)


def _reaches_input_device(value) -> bool:
    """Every use of ``value`` moves it to an input's device, possibly after device-keeping
    steps (detach, dtype-only casts)."""
    for use in value.uses():
        user = use.user
        if _moves_to_an_input_device(user):
            continue
        if user.kind() in ("aten::detach", "aten::to"):  # a dtype-only cast keeps the device
            if all(_reaches_input_device(out) for out in user.outputs()):
                continue
        return False
    return True


def _is_tensor_constant(node) -> bool:
    # 0-dim constants are the tracer's record of Python numbers in arithmetic (`x * 2`): a
    # 0-dim CPU tensor combines with a tensor on any device.
    if node.kind() != "prim::Constant" or node.output().type().kind() != "TensorType":
        return False
    value = node.output().toIValue()  # a Python number for 0-dim constants
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _pinned_creations(graph):
    """Nodes creating a tensor whose device is fixed at trace time and stays so."""
    pinned = []
    for node in graph.nodes():
        created = node.kind() in FACTORIES or _is_tensor_constant(node)
        if created and not all(_reaches_input_device(out) for out in node.outputs()):
            pinned.append(node)
    return pinned


class _Selection(torch.nn.Module):
    """The selection in per-level mode (every index tensor it makes is used)."""

    def forward(self, p0, p1, l0, l1):
        boxes, scores, levels, _ = find_top_proposals_per_level(
            [p0, p1], [l0, l1], [(64, 64), (48, 60)], 0.7, [50, 30], None, [10, 8], 0.0, False
        )
        return boxes, scores, levels


def _inputs(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (80, 40):
        xy = torch.rand(2, n, 2, generator=g) * 50
        out.append(torch.cat([xy, xy + torch.rand(2, n, 2, generator=g) * 20 + 1], dim=2))
    out += [torch.randn(2, 80, generator=g), torch.randn(2, 40, generator=g)]
    return tuple(x.to(device) for x in out)


def _trace(module, args):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, args, check_trace=False, strict=False)


def test_traced_selection_moves_every_created_tensor_to_the_input_device():
    traced = _trace(_Selection(), _inputs())
    pinned = _pinned_creations(traced.inlined_graph)
    assert not pinned, "\n".join(str(n) for n in pinned)


def test_the_graph_check_finds_a_pinned_device():
    # What the selection did before: index tensors made on the input's device while tracing.
    class Pinned(torch.nn.Module):
        def forward(self, x):
            return x[torch.arange(x.shape[0], device=x.device)]

    pinned = _pinned_creations(_trace(Pinned(), (torch.rand(4, 2),)).inlined_graph)
    assert [n.kind() for n in pinned] == ["aten::arange"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a second device)")
@pytest.mark.parametrize("trace_on, run_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_traced_on_one_device_runs_on_the_other(trace_on, run_on):
    traced = _trace(_Selection(), _inputs(trace_on))
    args = _inputs(run_on, seed=1)
    with torch.no_grad():
        got = traced(*args)
        want = _Selection()(*args)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a.device.type == run_on
            assert torch.equal(a, b)
