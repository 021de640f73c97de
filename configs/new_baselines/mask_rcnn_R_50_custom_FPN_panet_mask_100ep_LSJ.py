# PANet's mask head: every ROI pooled from every level (adaptive pooling) + a fused fc branch.
# On top of the twin of Detectron2's mask_rcnn_R_50_FPN_100ep_LSJ (same data, schedule, rest).
from detectron2.config import LazyCall as L

from fpn_plugin.lazy_config import pyramid_level_shapes
from fpn_plugin.mask_head import PANetMaskHead

from .mask_rcnn_R_50_custom_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

# The head pools by itself, from every level in mask_in_features, with the removed pooler's
# settings; StandardROIHeads then hands it the feature maps.
_fcn, _pooler = model.roi_heads.mask_head, model.roi_heads.mask_pooler
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = L(PANetMaskHead)(
    # {level: ShapeSpec(channels, stride)} of the levels in mask_in_features (p2-p5).
    input_shape=L(pyramid_level_shapes)(levels="${...mask_in_features}", channels=256),
    num_classes="${..num_classes}",
    conv_dims=_fcn.conv_dims,
    conv_norm=_fcn.conv_norm,
    pooler_resolution=_pooler.output_size,
    pooler_sampling_ratio=_pooler.sampling_ratio,
    pooler_type=_pooler.pooler_type,
    fuse_type="max",
    fused_fc=True,
)
