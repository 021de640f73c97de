"""The demo's config shrunk for tests (64 px images, narrow heads): a training step takes a
fraction of a second. Shared by the trainer tests and the train_net/demo entry tests."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")

# KEY VALUE overrides of DEMO_CONFIG.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]
# The embedded shapes dataset at the same size (for runs that generate it).
TINY_SHAPES_OPTS = ["DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2",
                    "DATASETS.SHAPES.IMAGE_SIZE", "64"]

# The LazyConfig demo (configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.py) at the same sizes:
# lazy_train_net.py key=value overrides.
LAZY_DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.py")
LAZY_TINY_OPTS = [
    "model.backbone.out_channels=32", "model.proposal_generator.head.in_channels=32",
    "model.roi_heads.box_head.input_shape.channels=32", "model.roi_heads.box_head.fc_dims=[64,64]",
    "model.roi_heads.box_predictor.input_shape.channels=64",
    "model.roi_heads.mask_head.input_shape.channels=32",
    "model.roi_heads.mask_head.conv_dims=[32,32,32,32,32]",
    "model.roi_heads.batch_size_per_image=32",
    "model.proposal_generator.pre_nms_topk=[200,100]",
    "model.proposal_generator.post_nms_topk=[50,50]",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.0.max_size=64",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=64",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0", "train.eval_period=0", "train.log_period=1",
    "dataloader.shapes.num_train=8", "dataloader.shapes.num_val=2",
    "dataloader.shapes.image_size=64",
]


def demo_config_at(commit: str, folder) -> str:
    """The demo YAML as it was at ``commit`` (``git show``), written under ``folder`` with
    today's base config beside it so its ``_BASE_`` resolves; skips the test where the git
    history (or that commit) is not at hand."""
    import subprocess

    import pytest

    rel = os.path.relpath(DEMO_CONFIG, ROOT)
    try:
        text = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with {commit} here")
    path = os.path.join(str(folder), "Demo", f"demo_{commit}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(ROOT, "configs", "Base-RCNN-CustomFPN.yaml")) as src, \
            open(os.path.join(str(folder), "Base-RCNN-CustomFPN.yaml"), "w") as dst:
        dst.write(src.read())
    return path
