"""
The parity model trains exactly like Detectron2's: the plugin's whole Mask R-CNN (neck,
per-level RPN, mask head) from its parity config and Detectron2's twin from the model zoo
(its FPN, RPN and mask head), built with one seed, fed the same batches and stepped by the
same optimizer, give bit-identical losses, gradients of every parameter and weights at every
step. The configs are shrunk alike (ResNet-18, narrow heads, 64 px images) so a few steps take
seconds; the architecture stays what the configs say.

Random sampling (RPN anchors, ROI proposals) draws from torch's global RNG: each side's step
starts from the same seed, and after the step both sides must have drawn the same amount
(equal RNG states), so the sampling calls come in the same order and number.

The pairs (``PARITY_PAIRS``): the YAML parity config and the LazyConfig twin of Detectron2's
``common/models/mask_rcnn_fpn.py``. To add one, add a function returning ``(ours, theirs)``,
the two models built (each right after ``torch.manual_seed(0)``) from configs shrunk alike.
"""
import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import fpn_plugin  # noqa: F401  (registers the components)
from fpn_plugin import add_fpn_plugin_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

# The same shrinking on both sides: sizes only, no component or behaviour changes.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.BACKBONE.FREEZE_AT", 0,  # every stage trains, so every conv's gradient is compared
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    # Batch statistics: with FrozenBN's identity statistics a randomly initialised ResNet's
    # activations grow by orders of magnitude and training diverges within two steps.
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 300,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
]


def _yaml_pair():
    ours = get_cfg()
    add_fpn_plugin_config(ours)
    ours.merge_from_file(
        os.path.join(ROOT, "configs", "COCO-InstanceSegmentation", "mask_rcnn_R_50_custom_fpn_1x.yaml"))
    theirs = get_cfg()
    theirs.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    models = []
    for cfg in (ours, theirs):
        cfg.merge_from_list(TINY)
        torch.manual_seed(0)
        models.append(build_model(cfg))
    return tuple(models)


def _lazy_pair():
    """The LazyConfig twin (configs/common/models/mask_rcnn_custom_fpn.py) and Detectron2's
    common/models/mask_rcnn_fpn.py, shrunk alike (tests/lazy's shrink, plus what TINY does)."""
    import importlib.util

    from detectron2.config import LazyConfig, instantiate

    from fpn_plugin.lazy_config import plain_data

    spec = importlib.util.spec_from_file_location(
        "lazy_testutils_for_training_parity", os.path.join(ROOT, "tests", "lazy", "lazy_testutils.py"))
    lazy_testutils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lazy_testutils)
    ours = LazyConfig.load(
        os.path.join(ROOT, "configs", "common", "models", "mask_rcnn_custom_fpn.py")).model
    theirs = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    models = []
    for node in (ours, theirs):
        lazy_testutils.shrink(plain_data(node))  # ShapeSpecs as LazyCalls, so they can shrink
        bottom_up = node.backbone.bottom_up
        bottom_up.stem.norm = bottom_up.stages.norm = "BN"  # as TINY: FrozenBN diverges here
        node.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
        node.roi_heads.num_classes = 3
        torch.manual_seed(0)
        models.append(instantiate(node))
    return tuple(models)


# name -> () -> (our model, Detectron2's model)
PARITY_PAIRS = {"yaml_parity_config": _yaml_pair, "lazy_config_twin": _lazy_pair}


def _optimizer(model):
    # The same plain SGD on both sides (momentum and weight decay make each step depend on
    # the previous ones, so a difference anywhere would carry on).
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                           momentum=0.9, weight_decay=1e-4)


def _batch(step, size=(64, 80)):
    """Two images with three polygon instances each, different at every step."""
    g = torch.Generator().manual_seed(100 + step)
    h, w = size
    batch = []
    for _ in range(2):
        boxes, polygons = [], []
        for _ in range(3):
            x0, y0 = (torch.rand(2, generator=g) * torch.tensor([w * 0.6, h * 0.6])).tolist()
            bw, bh = (torch.rand(2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 10).tolist()
            x1, y1 = min(x0 + bw, w - 1), min(y0 + bh, h - 1)
            boxes.append([x0, y0, x1, y1])
            polygons.append([[(x0 + x1) / 2, y0, x1, (y0 + y1) / 2, (x0 + x1) / 2, y1, x0,
                              (y0 + y1) / 2]])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.randint(3, (3,), generator=g)
        inst.gt_masks = PolygonMasks(polygons)
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "height": h, "width": w, "instances": inst})
    return batch


def _step(model, optimizer, batch, seed, iteration):
    """One training step; returns the losses, the RNG state after it and the gradients."""
    torch.manual_seed(seed)
    with EventStorage(iteration):
        losses = model(batch)
    rng = torch.get_rng_state()
    optimizer.zero_grad()
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return {k: v.detach() for k, v in losses.items()}, rng, grads


@pytest.mark.parametrize("pair", sorted(PARITY_PAIRS))
def test_parity_model_trains_like_detectron2(pair):
    ours, theirs = PARITY_PAIRS[pair]()
    # The pair really is the plugin's model against Detectron2's built-ins.
    assert type(ours.backbone).__module__.startswith("fpn_plugin.")
    assert type(ours.proposal_generator).__module__.startswith("fpn_plugin.")
    assert type(ours.proposal_generator.rpn_head).__module__.startswith("fpn_plugin.")
    assert type(ours.roi_heads.mask_head).__module__.startswith("fpn_plugin.")
    assert type(theirs.backbone).__module__.startswith("detectron2.")
    assert type(theirs.proposal_generator).__module__.startswith("detectron2.")
    assert type(theirs.roi_heads.mask_head).__module__.startswith("detectron2.")
    # One seed builds the same weights, name for name (the same initialisation, drawn in the
    # same order).
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for name, value in theirs_sd.items():
        assert torch.equal(ours_sd[name], value), name

    ours.train()
    theirs.train()
    opt_ours, opt_theirs = _optimizer(ours), _optimizer(theirs)
    trainable = [n for n, p in theirs.named_parameters() if p.requires_grad]
    for step in range(STEPS):
        batch = _batch(step)
        seed = 1000 + step
        losses_t, rng_t, grads_t = _step(theirs, opt_theirs, batch, seed, step)
        losses_o, rng_o, grads_o = _step(ours, opt_ours, batch, seed, step)

        assert losses_o.keys() == losses_t.keys() == {
            "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
        for k in losses_t:
            assert torch.equal(losses_o[k], losses_t[k]), (step, k, losses_o[k], losses_t[k])
            assert losses_t[k] > 0, (step, k)
        # Same number of random draws: the samplers were called alike.
        assert torch.equal(rng_o, rng_t), step
        assert sorted(grads_o) == sorted(grads_t) == sorted(trainable)
        for name in trainable:
            assert torch.equal(grads_o[name], grads_t[name]), (step, name)
        # Every component learns (a part cut off from the loss would have zero gradients).
        for prefix in ("backbone.bottom_up.", "backbone.fpn_", "proposal_generator.",
                       "roi_heads.box_", "roi_heads.mask_head."):
            assert any(grads_t[n].abs().sum() > 0 for n in trainable if n.startswith(prefix)), \
                (step, prefix)
        # The updated weights and BN statistics stay equal.
        ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
        for name, value in theirs_sd.items():
            assert torch.equal(ours_sd[name], value), (step, name)
