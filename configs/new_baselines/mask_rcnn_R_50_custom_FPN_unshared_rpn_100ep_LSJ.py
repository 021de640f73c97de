# An RPN head (its 2 convs and predictors) per pyramid level instead of one shared head.
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.proposal_generator.head.shared = False
model.proposal_generator.head.num_levels = 5  # p2-p6, model.proposal_generator.in_features
