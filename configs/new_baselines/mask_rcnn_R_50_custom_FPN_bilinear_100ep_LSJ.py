# Bilinear top-down upsampling in the neck (nearest in Detectron2's FPN).
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.backbone.upsample_mode = "bilinear"
