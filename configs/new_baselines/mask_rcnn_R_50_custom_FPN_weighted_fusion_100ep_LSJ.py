# Fast normalized (learned, non-negative) weighted fusion of the top-down merges (EfficientDet).
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.backbone.fuse_type = "weighted"
model.backbone.weighted_fusion_eps = 1e-4
