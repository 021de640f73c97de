"""
The ``Instances`` fields a scripted model declares (Detectron2's ``scripting_with_instances``
needs every field the model sets, with its type).

:data:`MASK_RCNN_FIELDS` is Detectron2's own list for a Mask R-CNN (the one its
``tools/deploy/export_model.py`` and ``tests/test_export_torchscript.py`` script
``GeneralizedRCNN`` with). A plugin model built with the default config sets exactly these, so
it scripts with Detectron2's list unchanged. :data:`PLUGIN_EXTRA_FIELDS` are the fields a plugin
component sets only when asked to (``MODEL.RPN.RECORD_PROPOSAL_LEVELS: True`` makes
``PerLevelRPN`` record ``proposal_levels``; ``MaskScoringHead`` sets ``mask_scores``);
:func:`plugin_fields` adds them.
"""
from typing import Dict, Optional

import torch
from detectron2.structures import Boxes
from torch import nn

__all__ = ["MASK_RCNN_FIELDS", "PLUGIN_EXTRA_FIELDS", "plugin_fields"]

MASK_RCNN_FIELDS: Dict[str, type] = {
    "proposal_boxes": Boxes,
    "objectness_logits": torch.Tensor,
    "pred_boxes": Boxes,
    "scores": torch.Tensor,
    "pred_classes": torch.Tensor,
    "pred_masks": torch.Tensor,
}

# Field -> type, for the fields a plugin component sets only when its switch is on.
PLUGIN_EXTRA_FIELDS: Dict[str, type] = {
    # PerLevelRPN with record_proposal_levels (MODEL.RPN.RECORD_PROPOSAL_LEVELS): int64 level
    # index into MODEL.RPN.IN_FEATURES of each inference proposal.
    "proposal_levels": torch.Tensor,
    # MaskScoringHead (MODEL.ROI_MASK_HEAD.NAME): float (R,) score of each detection's mask,
    # the detection score times the predicted mask IoU ("scores" stays the box score).
    "mask_scores": torch.Tensor,
}


def _sets_proposal_levels(model: nn.Module) -> bool:
    return any(getattr(m, "record_proposal_levels", False) is True for m in model.modules())


def _sets_mask_scores(model: nn.Module) -> bool:
    return any(getattr(m, "sets_mask_scores", False) is True for m in model.modules())


def plugin_fields(model: Optional[nn.Module] = None) -> Dict[str, type]:
    """
    The field list to script a model of the plugin with (``scripting_with_instances``).

    Args:
        model: a built model. Given: Detectron2's Mask R-CNN fields plus the extra fields this
            model's components set (none with the default config). None: Detectron2's fields
            plus every extra field (declared fields a model never sets do no harm, so this
            list scripts any plugin Mask R-CNN).

    Returns:
        dict[str, type]: field name -> ``Boxes`` or ``torch.Tensor``, a new dict.
    """
    fields = dict(MASK_RCNN_FIELDS)
    if model is None or _sets_proposal_levels(model):
        fields["proposal_levels"] = PLUGIN_EXTRA_FIELDS["proposal_levels"]
    if model is None or _sets_mask_scores(model):
        fields["mask_scores"] = PLUGIN_EXTRA_FIELDS["mask_scores"]
    return fields
