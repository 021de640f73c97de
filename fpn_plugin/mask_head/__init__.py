"""
Mask heads registered in ROI_MASK_HEAD_REGISTRY:

- ``ConvUpsampleMaskHead``: Detectron2's FCN mask head (identical logits, loss and
  parameter names), with options for convs, norm, upsampling and class-agnostic masks;
- ``PANetMaskHead``: adaptive multi-level ROI pooling and a fused fc branch (PANet);
- ``MaskScoringHead``: the FCN head + a MaskIoU branch that rescores the masks (Mask Scoring
  R-CNN).

Their shared layers are in ``layers.py``, the multi-level pooling in ``pooling.py``.
"""
from .config import add_mask_head_config
from .conv_upsample import ConvUpsampleMaskHead
from .mask_scoring import MaskScoringHead
from .panet import PANetMaskHead

__all__ = ["add_mask_head_config", "ConvUpsampleMaskHead", "PANetMaskHead", "MaskScoringHead"]
