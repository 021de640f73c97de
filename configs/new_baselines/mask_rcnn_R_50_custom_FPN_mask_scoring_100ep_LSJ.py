# Mask Scoring R-CNN's mask head (fpn_plugin.mask_head.MaskScoringHead): the twin's FCN mask
# head, same arguments, plus a MaskIoU branch (4 convs of 256, 2 fc of 1024, loss weight 1)
# whose predicted IoU rescores the masks (the instances' mask_scores).
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from fpn_plugin.mask_head import MaskScoringHead

from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.mask_head._target_ = MaskScoringHead
