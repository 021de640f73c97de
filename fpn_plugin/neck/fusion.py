"""
Fusion of same-shape feature maps at the nodes of a feature pyramid (pure tensor code).

One fusion module serves every node of a pathway (e.g. all top-down merges): ``forward``
takes the node's inputs and the node index. Keeping the per-node weights in one tensor
indexed by ``node`` lets the neck loop over levels in TorchScript, which cannot index a
``ModuleList`` with a loop variable.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FUSE_TYPES", "SumFusion", "AvgFusion", "WeightedFusion", "build_fusion"]

FUSE_TYPES = ("sum", "avg", "weighted")


class SumFusion(nn.Module):
    """Element-wise sum of the inputs (Detectron2's ``fuse_type="sum"``)."""

    def forward(self, inputs: List[Tensor], node: int) -> Tensor:
        """
        Args:
            inputs (list[Tensor]): maps of one shape `(N, C, H, W)`, summed in list order.
            node (int): index of the fusion node (unused: no per-node state).

        Returns:
            Tensor: `(N, C, H, W)`.
        """
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        return out


class AvgFusion(nn.Module):
    """Element-wise mean of the inputs (Detectron2's ``fuse_type="avg"``: sum, then divide)."""

    def forward(self, inputs: List[Tensor], node: int) -> Tensor:
        """
        Args:
            inputs (list[Tensor]): maps of one shape `(N, C, H, W)`.
            node (int): index of the fusion node (unused).

        Returns:
            Tensor: `(N, C, H, W)`, the sum divided by ``len(inputs)``.
        """
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        return out / len(inputs)


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
        fuse_type (str): one of :data:`FUSE_TYPES`.
        num_nodes (int): fusion nodes served by the module.
        num_inputs (int): inputs per node.
        eps (float): epsilon of "weighted" fusion (ignored otherwise).

    Returns:
        nn.Module: a module called as ``fusion(inputs: List[Tensor], node: int) -> Tensor``.
    """
    if fuse_type == "sum":
        return SumFusion()
    if fuse_type == "avg":
        return AvgFusion()
    if fuse_type == "weighted":
        return WeightedFusion(num_nodes, num_inputs, eps)
    raise ValueError(f"fuse_type must be one of {list(FUSE_TYPES)}, got {fuse_type!r}")
