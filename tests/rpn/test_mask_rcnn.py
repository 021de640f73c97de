"""A tiny Mask R-CNN (ResNet-18 FPN, 128 px) with the per-level RPN: checkpoints, training."""
import itertools
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from model_testutils import tiny_mask_rcnn_cfg

from fpn_plugin import add_fpn_plugin_config

LEVELS = ["p2", "p3", "p4", "p5", "p6"]


def _tiny_cfg(backbone="build_resnet_fpn_backbone", plugin_rpn=True):
    # The shared tiny model, sized for training at 128 px; the built-in mask head, so these
    # tests see only the RPN change.
    cfg = tiny_mask_rcnn_cfg(num_classes=2)
    add_fpn_plugin_config(cfg)
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.RPN.IN_FEATURES = list(LEVELS)
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.TEST.DETECTIONS_PER_IMAGE = get_cfg().TEST.DETECTIONS_PER_IMAGE
    cfg.INPUT.MIN_SIZE_TEST = get_cfg().INPUT.MIN_SIZE_TEST
    cfg.INPUT.MAX_SIZE_TEST = get_cfg().INPUT.MAX_SIZE_TEST
    if plugin_rpn:
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PerLevelRPN"
        cfg.MODEL.RPN.HEAD_NAME = "PerLevelRPNHead"
    return cfg


def _batch(num_images=2, size=128, seed=0):
    """Images with coloured rectangles; each rectangle is an instance (class = colour)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.full((3, size, size), 40.0)
        boxes, classes, masks = [], [], []
        for k in range(3):
            x0, y0 = (torch.rand(2, generator=g) * size * 0.6).long().tolist()
            w, h = (torch.rand(2, generator=g) * size * 0.3 + 12).long().tolist()
            x1, y1 = min(x0 + w, size), min(y0 + h, size)
            cls = k % 2
            color = [200.0, 60.0, 60.0] if cls else [60.0, 200.0, 90.0]
            image[:, y0:y1, x0:x1] = torch.tensor(color)[:, None, None]
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y0:y1, x0:x1] = True
            boxes.append([x0, y0, x1, y1])
            classes.append(cls)
            masks.append(mask)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        inst.gt_masks = BitMasks(torch.stack(masks))
        batch.append({"image": image, "height": size, "width": size, "instances": inst})
    return batch


def test_builtin_checkpoint_loads_and_gives_identical_detections():
    # Detectron2's own backbone on both sides, so only the proposal generator differs.
    torch.manual_seed(0)
    ref = build_model(_tiny_cfg(plugin_rpn=False)).eval()
    model = build_model(_tiny_cfg(plugin_rpn=True)).eval()
    assert type(model.proposal_generator).__name__ == "PerLevelRPN"
    incompatible = model.load_state_dict(ref.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in _batch(seed=1)]
    with torch.no_grad():
        got, want = model(inputs), ref(inputs)
    for g, w in zip(got, want):
        g, w = g["instances"], w["instances"]
        assert len(w) > 0
        assert torch.equal(g.pred_boxes.tensor, w.pred_boxes.tensor)
        assert torch.equal(g.scores, w.scores) and torch.equal(g.pred_classes, w.pred_classes)
        assert torch.equal(g.pred_masks, w.pred_masks)


VARIANTS = {
    "unshared_heads": {"MODEL.RPN.SHARED_HEAD": False},
    "per_level_anchor_counts": {
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]] * 4 + [[0.25, 0.5, 1.0, 2.0, 4.0]]
    },
    "unshared_gn_per_level_topk": {
        "MODEL.RPN.SHARED_HEAD": False,
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[1.0]]
        + [[0.5, 1.0, 2.0]] * 3
        + [[0.25, 0.5, 1.0, 2.0, 4.0]],
        "MODEL.RPN.HEAD_NORM": "GN",
        "MODEL.RPN.CONV_DIMS": [-1, -1],
        "MODEL.RPN.POST_NMS_TOPK_MODE": "per_level",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN_PER_LEVEL": [40, 30, 20, 10, 10],
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trains_with_finite_decreasing_losses_and_per_level_metrics(variant, set_key):
    # The whole plugin: its neck (Detectron2-equivalent defaults) under the per-level RPN.
    cfg = _tiny_cfg(backbone="build_resnet_custom_fpn_backbone")
    for key, value in VARIANTS[variant].items():
        set_key(cfg, key, value)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = SimpleTrainer(model, itertools.repeat(_batch(seed=2)), optimizer)
    num_iters = 8
    trainer.train(0, num_iters)
    storage = trainer.storage

    totals = [v for v, _ in storage.history("total_loss").values()]
    assert len(totals) == num_iters and all(math.isfinite(t) for t in totals)
    for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"):
        assert all(math.isfinite(v) for v, _ in storage.history(k).values()), k
    # Same batch every step: the loss must go down.
    assert sum(totals[-2:]) < sum(totals[:2]), totals
    rpn_cls = [v for v, _ in storage.history("loss_rpn_cls").values()]
    assert rpn_cls[-1] < rpn_cls[0], rpn_cls

    for f in LEVELS:
        for stat in ("num_pos_anchors", "num_neg_anchors", "num_proposals_after_nms",
                     "num_proposals"):
            assert len(storage.history(f"rpn/{stat}_{f}").values()) == num_iters
    assert sum(storage.history(f"rpn/num_proposals_{f}").latest() for f in LEVELS) > 0
