"""
Per-level RPN: one head shared across pyramid levels (or one per level), per-level proposal
selection and merge. Importing this package registers ``PerLevelRPN``
(PROPOSAL_GENERATOR_REGISTRY) and ``PerLevelRPNHead`` (RPN_HEAD_REGISTRY).
"""
from .head import PerLevelRPNHead
from .per_level_rpn import PerLevelRPN
from .postprocess import find_top_proposals_per_level

__all__ = ["PerLevelRPN", "PerLevelRPNHead", "find_top_proposals_per_level"]
