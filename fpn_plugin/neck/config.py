"""Config keys of the FPN neck (added to ``cfg.MODEL.FPN``, next to Detectron2's own)."""


def add_neck_config(cfg):
    """
    Add the neck's keys to ``cfg.MODEL.FPN``. Detectron2's keys (IN_FEATURES, OUT_CHANNELS,
    NORM, FUSE_TYPE) keep their meaning; every default here reproduces Detectron2's FPN.
    """
    fpn = cfg.MODEL.FPN
    # Backbone built under the neck by `build_fpn_plugin_backbone` (any BACKBONE_REGISTRY name).
    fpn.BOTTOM_UP_BACKBONE = "build_resnet_backbone"
    # Extra levels above the last input: "none" | "maxpool" (P6 = maxpool(P5)) |
    # "p6p7_res5" (P6/P7 3x3 stride-2 convs from the last backbone feature, RetinaNet) |
    # "p6p7_p5" (the same convs from P5).
    fpn.TOP_BLOCK = "maxpool"
    # Top-down upsampling: "nearest" | "bilinear".
    fpn.UPSAMPLE_MODE = "nearest"
    # FUSE_TYPE also accepts "weighted": fast normalized fusion with learnable, non-negative
    # per-input weights (EfficientDet). Epsilon of its normalisation:
    fpn.WEIGHTED_FUSION_EPS = 1e-4
    # PANet bottom-up path augmentation after the top-down path.
    fpn.BOTTOM_UP_PATH = False
