# A different number of anchors per level: 3 aspect ratios on p2-p5, 5 on p6.
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.proposal_generator.anchor_generator.aspect_ratios = [[0.5, 1.0, 2.0]] * 4 + [
    [0.25, 0.5, 1.0, 2.0, 4.0]
]
# The head predicts what the anchor generator lays out: sizes x aspect ratios per position.
model.proposal_generator.head.num_anchors = [3, 3, 3, 3, 5]
