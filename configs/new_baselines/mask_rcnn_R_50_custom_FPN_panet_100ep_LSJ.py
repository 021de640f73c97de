# PANet's bottom-up path augmentation in the neck (the neck is then a PAFPN, fpn_plugin.neck).
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from fpn_plugin.neck import PAFPN

from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.backbone._target_ = PAFPN
