# The CPU demo as a LazyConfig, the twin of mask_rcnn_R_18_custom_fpn_shapes.yaml (same model,
# data, optimizer and schedule): Mask R-CNN from fpn_plugin's components, ResNet-18 trained from
# scratch on the embedded shapes dataset (trained at 160 px in batches of 16, tested at 192 px),
# AdamW, 320 iterations, on CPU.
#   python projects/fpn_mask_rcnn/lazy_train_net.py \
#       --config-file configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.py
# The model, data pipeline and train settings start from Detectron2's common LazyConfig pieces
# (read from its model zoo) and are sized here like the YAML demo.
import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from fpn_plugin.model_zoo import get_detectron2_config

from ..common.models.mask_rcnn_custom_fpn import model

# -- model: ResNet-18 + a 128-channel neck, narrow heads --------------------------------------
bottom_up = model.backbone.bottom_up
bottom_up.freeze_at = 0  # nothing is pretrained, so every stage must learn
bottom_up.stem.norm = "BN"  # real batch statistics: FrozenBN only suits pretrained weights
bottom_up.stages.depth = 18
bottom_up.stages.norm = "BN"
del bottom_up.stages.stride_in_1x1  # ResNet-18's basic blocks have no 1x1 conv to stride
model.backbone.out_channels = 128
model.backbone.norm = "BN"  # normalized pyramid: from scratch, the heads learn much faster
model.backbone.fuse_type = "weighted"  # fast normalized fusion and bilinear top-down upsampling:
model.backbone.upsample_mode = "bilinear"  # the variants that learn fastest (docs/variants.md)
rpn = model.proposal_generator
rpn.head.in_channels = 128
rpn.in_features = ["p3", "p4", "p5", "p6"]  # no RPN on p2: cheaper, a faster classifier
rpn.anchor_generator.sizes = [[16], [32], [64], [128]]  # objects are 16-80 px at 160 px
rpn.anchor_generator.strides = [8, 16, 32, 64]  # of p3-p6
rpn.pre_nms_topk = (1000, 500)  # (training, inference), per level
rpn.post_nms_topk = (500, 200)  # per image
roi_heads = model.roi_heads
roi_heads.num_classes = 4
roi_heads.batch_size_per_image = 16  # 16 ROIs per image, half of them positive: 16 images
roi_heads.positive_fraction = 0.5  # per batch learn faster per image than 4 with 64 ROIs
roi_heads.box_head.input_shape.channels = 128
roi_heads.box_head.fc_dims = [512, 512]
roi_heads.box_predictor.input_shape.channels = 512
roi_heads.box_predictor.test_topk_per_image = 20
roi_heads.mask_head.input_shape.channels = 128
roi_heads.mask_head.conv_dims = [64] * 5  # 4 convs + the deconv
del bottom_up, rpn, roi_heads  # shorthands only: LazyConfig.load would keep them as entries

# -- data: the shapes dataset (256 px images), trained at 160 px and tested at 192 px ----------
dataloader = get_detectron2_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(160,), max_size=160, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=192, max_size=192, sample_style="choice")
]
dataloader.test.num_workers = 1
# lazy_train_net.py generates the dataset here if missing (a pure function of these values) and
# registers it as "shapes_train" / "shapes_val" (the YAML demo's DATASETS.SHAPES.*).
dataloader.shapes = dict(
    root="datasets/generated/shapes", num_train=400, num_val=100, image_size=256, seed=0
)

# -- optimizer and schedule: AdamW, warm-up, two steps -----------------------------------------
# From scratch in a few hundred steps AdamW gets far further than SGD (the YAML demo's tuning).
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.001,
    weight_decay=1e-4,
)
train = get_detectron2_config("common/train.py").train
train.output_dir = "output/demo_lazy"
train.max_iter = 320
train.eval_period = 160
train.checkpointer.period = 160
train.device = "cpu"
train.seed = 0  # reproducible runs (same weights init, data order and flips)
# Fractions of train.max_iter (LRMultiplier evaluates it at iteration / max_iter).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[240, 293], num_updates=train.max_iter
    ),
    warmup_length=30 / train.max_iter,
    warmup_factor=0.001,
)
