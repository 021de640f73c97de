"""Config keys of the FPN neck (added to ``cfg.MODEL.FPN``, next to Detectron2's own)."""
from detectron2.config import CfgNode as CN


def add_neck_config(cfg):
    """
    Add the neck's keys to ``cfg.MODEL.FPN`` (in place).

    Detectron2's own keys keep their meaning and defaults: ``IN_FEATURES`` (backbone features
    fed to the neck, high to low resolution), ``OUT_CHANNELS`` (channels of every pyramid
    level, 256), ``NORM`` (norm of lateral/output convs: "" | "BN" | "SyncBN" | "FrozenBN" |
    "GN" | anything ``detectron2.layers.get_norm`` accepts) and ``FUSE_TYPE`` ("sum" | "avg",
    here also "weighted"; "mean" is a synonym of "avg", the plugin's one fusion vocabulary
    in :mod:`fpn_plugin.layers.fusion`). Every default added here reproduces Detectron2's FPN
    (``build_resnet_fpn_backbone``) exactly. The keys are read by ``CustomFPN.from_config``
    and checked by its constructor (``BOTTOM_UP_BACKBONE`` and the variant switch
    ``BOTTOM_UP_PATH`` / ``BIFPN.ENABLED`` by the builders in :mod:`fpn_plugin.neck.build`).

    Args:
        cfg (CfgNode): a Detectron2 config, e.g. from ``detectron2.config.get_cfg()``.
    """
    fpn = cfg.MODEL.FPN
    # BACKBONE_REGISTRY name of the bottom-up backbone that `build_custom_fpn_backbone` puts
    # under the neck; it is called as `builder(cfg, input_shape)` and must return a Backbone.
    # (`build_resnet_custom_fpn_backbone` always uses ResNet and ignores this key.)
    fpn.BOTTOM_UP_BACKBONE = "build_resnet_backbone"
    # Extra levels above the last pyramid level (names: fpn_plugin.neck.top_blocks):
    #   "none"      no extra level;
    #   "maxpool"   P6 = max_pool(P5, kernel 1, stride 2)  (Faster/Mask R-CNN FPN);
    #   "p6p7_res5" P6/P7 3x3 stride-2 convs from the last backbone feature (res5), RetinaNet;
    #   "p6p7_p5"   the same convs from the last pyramid level (P5), as in FCOS.
    fpn.TOP_BLOCK = "maxpool"
    # Top-down upsampling of the coarser level to the lateral's size: "nearest" | "bilinear"
    # (bilinear uses align_corners=False).
    fpn.UPSAMPLE_MODE = "nearest"
    # FUSE_TYPE also accepts "weighted": fast normalized fusion (EfficientDet/BiFPN) with one
    # learnable weight per input and fusion node, kept non-negative by a ReLU:
    # out = sum_i relu(w_i) * x_i / (sum_j relu(w_j) + eps). Its eps:
    fpn.WEIGHTED_FUSION_EPS = 1e-4
    # PANet bottom-up path augmentation after the top-down path (the neck is then a PAFPN,
    # fpn_plugin.neck.pafpn): N2 = P2 and N(i) = conv3x3(fuse(P(i), conv3x3_stride2(N(i-1))));
    # its convs use NORM as well.
    fpn.BOTTOM_UP_PATH = False
    # BiFPN (EfficientDet; the neck is then a BiFPN, fpn_plugin.neck.bifpn): the lateral 1x1
    # convs, then NUM_CELLS bidirectional cells (top-down, then bottom-up with the extra
    # same-level input edge), each node a FUSE_TYPE fusion ("weighted" is the paper's fast
    # normalized fusion) and a depthwise-separable 3x3 conv + NORM + swish; then TOP_BLOCK.
    # The width is OUT_CHANNELS. Replaces the top-down pathway (no fpn_output convs).
    fpn.BIFPN = CN()
    fpn.BIFPN.ENABLED = False
    # Cells stacked, >= 0 (0: the lateral convs and the top block only).
    fpn.BIFPN.NUM_CELLS = 3
