"""A tiny Mask R-CNN config shared by the tests that need a whole model (export, fast path)."""
from detectron2.config import get_cfg

from fpn_plugin import add_fpn_plugin_config


def tiny_mask_rcnn_cfg(num_classes=2, components="detectron2"):
    """
    Mask R-CNN, ResNet-18 FPN, narrow heads, tiny test resolution, CPU.

    Args:
        num_classes (int): ROI_HEADS.NUM_CLASSES.
        components (str): "detectron2" builds Detectron2's own FPN, RPN and mask head (on a
            config without the plugin's keys); "plugin" builds fpn_plugin's neck, per-level
            RPN and parity mask head (the config gets the plugin's keys).
    """
    if components not in ("detectron2", "plugin"):
        raise ValueError(f"components must be 'detectron2' or 'plugin', got {components!r}")
    plugin = components == "plugin"
    cfg = get_cfg()
    if plugin:
        add_fpn_plugin_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_custom_fpn_backbone" if plugin else "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    if plugin:
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PerLevelRPN"
        cfg.MODEL.RPN.HEAD_NAME = "PerLevelRPNHead"
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NAME = "ConvUpsampleMaskHead" if plugin else "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    return cfg
