# A BiFPN neck (EfficientDet; fpn_plugin.neck.BiFPN): the lateral 1x1 convs, 3 bidirectional
# cells with fast normalized weighted fusion and depthwise-separable convs (the recipe's
# SyncBN, swish), then max-pool P6.
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from fpn_plugin.neck import BiFPN

from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.backbone._target_ = BiFPN
model.backbone.fuse_type = "weighted"
model.backbone.num_cells = 3
