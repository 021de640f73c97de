"""
Per-level RPN: one head shared across pyramid levels (or one per level), per-level proposal
selection and merge. Importing this package registers ``PerLevelRPN``
(PROPOSAL_GENERATOR_REGISTRY) and ``PerLevelRPNHead`` (RPN_HEAD_REGISTRY, which builds one of
the layout classes in ``head.py``).
"""
from .head import PerLevelRPNHead, SharedConvGroupedRPNHead, SharedRPNHead, UnsharedRPNHead
from .per_level_rpn import PerLevelRPN
from .postprocess import find_top_proposals_per_level

__all__ = [
    "PerLevelRPN",
    "PerLevelRPNHead",
    "SharedRPNHead",
    "SharedConvGroupedRPNHead",
    "UnsharedRPNHead",
    "find_top_proposals_per_level",
]
