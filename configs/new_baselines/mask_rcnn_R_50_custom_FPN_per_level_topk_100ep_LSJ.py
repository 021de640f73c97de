# Per-level proposal budgets: pre- and post-NMS top-k chosen per level (p2-p6).
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

# (training, inference); one entry per level of model.proposal_generator.in_features.
model.proposal_generator.pre_nms_topk = (
    [4000, 2000, 1000, 1000, 1000],
    [2000, 1000, 1000, 500, 500],
)
# post_nms_topk is per image (Detectron2's meaning); None hands the cut to the per-level lists.
model.proposal_generator.post_nms_topk = (None, None)
model.proposal_generator.post_nms_topk_per_level = (
    [400, 250, 150, 100, 100],
    [400, 250, 150, 100, 100],
)
