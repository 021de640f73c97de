"""
Element-wise fusion of same-shape feature maps (pure tensor code), and the one vocabulary of
fusion names that every component's config key uses.

A fusion module serves every node of a pathway (e.g. all top-down merges of the neck):
``forward`` takes the node's inputs and the node index. Keeping the per-node weights in one
tensor indexed by ``node`` lets a neck loop over levels in TorchScript, which cannot index a
``ModuleList`` with a loop variable.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FUSE_TYPES",
    "FUSE_TYPE_SYNONYMS",
    "check_fuse_type",
    "canonical_fuse_type",
    "fuse_levels",
    "ElementwiseFusion",
    "SumFusion",
    "AvgFusion",
    "MaxFusion",
    "WeightedFusion",
    "build_fusion",
]

# One word per operation. "avg" is Detectron2's word (MODEL.FPN.FUSE_TYPE); "mean", the word
# MODEL.ROI_MASK_HEAD.PANET.FUSE_TYPE has always accepted, is the same operation.
FUSE_TYPES = ("sum", "avg", "max", "weighted")
FUSE_TYPE_SYNONYMS: Dict[str, str] = {"mean": "avg"}


def canonical_fuse_type(fuse_type: str) -> str:
    """The :data:`FUSE_TYPES` word for ``fuse_type`` ("mean" -> "avg"; others unchanged)."""
    return FUSE_TYPE_SYNONYMS.get(fuse_type, fuse_type)


def check_fuse_type(fuse_type, accepted: Sequence[str], key: str) -> str:
    """
    Args:
        fuse_type: the value to check.
        accepted (list[str]): the :data:`FUSE_TYPES` words the component implements.
        key (str): the config key that sets the value, named in the error.

    Returns:
        str: the canonical word.

    Raises:
        ValueError: naming ``key`` and the value, if ``fuse_type`` is neither an accepted word
            nor a synonym of one.
    """
    canonical = canonical_fuse_type(fuse_type) if isinstance(fuse_type, str) else fuse_type
    if canonical not in accepted:
        words = list(accepted) + [s for s, w in FUSE_TYPE_SYNONYMS.items() if w in accepted]
        raise ValueError(f"{key}={fuse_type!r} is not one of {words}")
    return canonical


def fuse_levels(inputs: List[Tensor], fuse_type: str) -> Tensor:
    """
    Parameter-free fusion of same-shape maps.

    Args:
        inputs (list[Tensor]): L >= 1 tensors of one shape, e.g. `(N, C, H, W)`, combined in
            list order.
        fuse_type (str): "sum", "avg" (the sum divided by L; "mean" is a synonym) or "max"
            (element-wise maximum).

    Returns:
        Tensor: the shape of each input.
    """
    if len(inputs) == 0:
        raise ValueError("fuse_levels needs at least one level")
    if fuse_type == "mean":
        fuse_type = "avg"
    if fuse_type != "max" and fuse_type != "sum" and fuse_type != "avg":
        # String concatenation, not f-strings with conversions: TorchScript compiles this.
        raise ValueError(
            "fuse_type must be 'sum', 'avg' ('mean') or 'max', got '" + fuse_type + "'"
        )
    fused = inputs[0]
    for x in inputs[1:]:
        if fuse_type == "max":
            fused = torch.max(fused, x)
        else:
            fused = fused + x
    if fuse_type == "avg":
        fused = fused / float(len(inputs))
    return fused


class ElementwiseFusion(nn.Module):
    """Parameter-free fusion (:func:`fuse_levels`) as a fusion module."""

    fuse_type: torch.jit.Final[str]

    def __init__(self, fuse_type: str):
        """
        Args:
            fuse_type (str): "sum", "avg" ("mean") or "max".
        """
        super().__init__()
        self.fuse_type = canonical_fuse_type(fuse_type)

    def forward(self, inputs: List[Tensor], node: int) -> Tensor:
        """
        Args:
            inputs (list[Tensor]): maps of one shape `(N, C, H, W)`, combined in list order.
            node (int): index of the fusion node (unused: no per-node state).

        Returns:
            Tensor: `(N, C, H, W)`.
        """
        return fuse_levels(inputs, self.fuse_type)

    def extra_repr(self) -> str:
        return f"fuse_type={self.fuse_type!r}"


class SumFusion(ElementwiseFusion):
    """Element-wise sum of the inputs (Detectron2's ``fuse_type="sum"``)."""

    def __init__(self):
        super().__init__("sum")


class AvgFusion(ElementwiseFusion):
    """Element-wise mean of the inputs (Detectron2's ``fuse_type="avg"``: sum, then divide)."""

    def __init__(self):
        super().__init__("avg")


class MaxFusion(ElementwiseFusion):
    """Element-wise maximum of the inputs (PANet's fusion of pooled ROI levels)."""

    def __init__(self):
        super().__init__("max")


class WeightedFusion(nn.Module):
    """
    Fast normalized fusion (EfficientDet, Tan et al. 2020):
    ``out = sum_i w_i * x_i / (eps + sum_j w_j)`` with ``w = relu(weight[node])``.

    The ReLU keeps the weights that are used non-negative whatever the optimizer does to the
    raw parameter, and the normalisation keeps the output a convex-like combination without
    a softmax. A raw weight driven below zero stops receiving gradient (as in EfficientDet).
    """

    eps: torch.jit.Final[float]
    num_inputs: torch.jit.Final[int]

    def __init__(self, num_nodes: int, num_inputs: int, eps: float = 1e-4):
        """
        Args:
            num_nodes (int): fusion nodes served by this module (one weight row each).
            num_inputs (int): inputs fused at every node.
            eps (float): added to the weight sum; keeps the division finite when all
                weights are zero.
        """
        super().__init__()
        # Ones: every input starts with an equal share, like an average.
        self.weight = nn.Parameter(torch.ones(num_nodes, num_inputs))
        self.eps = float(eps)
        self.num_inputs = int(num_inputs)

    def normalized_weights(self, node: int) -> Tensor:
        """
        Returns:
            Tensor: `(num_inputs,)`, the non-negative weights applied at ``node``.
        """
        w = F.relu(self.weight[node])
        return w / (w.sum() + self.eps)

    def forward(self, inputs: List[Tensor], node: int) -> Tensor:
        """
        Args:
            inputs (list[Tensor]): ``num_inputs`` maps of one shape `(N, C, H, W)`.
            node (int): index of the fusion node, in ``[0, num_nodes)``.

        Returns:
            Tensor: `(N, C, H, W)`.
        """
        if len(inputs) != self.num_inputs:
            raise ValueError("WeightedFusion got a different number of inputs than num_inputs")
        w = self.normalized_weights(node)
        out = inputs[0] * w[0]
        for i in range(1, len(inputs)):
            out = out + inputs[i] * w[i]
        return out

    def extra_repr(self) -> str:
        return f"num_nodes={self.weight.shape[0]}, num_inputs={self.num_inputs}, eps={self.eps}"


def build_fusion(fuse_type: str, num_nodes: int, num_inputs: int, eps: float = 1e-4) -> nn.Module:
    """
    Args:
        fuse_type (str): one of :data:`FUSE_TYPES` (or a synonym).
        num_nodes (int): fusion nodes served by the module.
        num_inputs (int): inputs per node.
        eps (float): epsilon of "weighted" fusion (ignored otherwise).

    Returns:
        nn.Module: a module called as ``fusion(inputs: List[Tensor], node: int) -> Tensor``;
        only "weighted" has parameters (``weight``, `(num_nodes, num_inputs)`).
    """
    fuse_type = check_fuse_type(fuse_type, FUSE_TYPES, "fuse_type")
    if fuse_type == "weighted":
        return WeightedFusion(num_nodes, num_inputs, eps)
    return {"sum": SumFusion, "avg": AvgFusion, "max": MaxFusion}[fuse_type]()

