"""
Every YAML under configs/ builds its model from fpn_plugin's components and trains one step
on a tiny input; the COCO configs equal Detectron2's model-zoo configs apart from the
component names, and the parity config reproduces Detectron2's detections with its weights.
"""
import glob
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    build_model,
)
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import fpn_plugin  # noqa: F401  (registers the components)
from fpn_plugin import add_fpn_plugin_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, os.path.join(ROOT, "configs"))
                 for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
# Our config -> Detectron2 model-zoo config it must equal (up to the component names).
ZOO_TWINS = {
    "Base-RCNN-CustomFPN.yaml": "Base-RCNN-FPN.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml":
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_3x.yaml":
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_101_custom_fpn_3x.yaml":
        "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
}
# Component keys: (config key path, registry). The named object must come from fpn_plugin.
COMPONENT_KEYS = [
    (("MODEL", "BACKBONE", "NAME"), BACKBONE_REGISTRY),
    (("MODEL", "PROPOSAL_GENERATOR", "NAME"), PROPOSAL_GENERATOR_REGISTRY),
    (("MODEL", "RPN", "HEAD_NAME"), RPN_HEAD_REGISTRY),
    (("MODEL", "ROI_MASK_HEAD", "NAME"), ROI_MASK_HEAD_REGISTRY),
]
# Detectron2's built-in names our configs replace (everything else must be equal).
BUILTIN_NAMES = {
    ("MODEL", "BACKBONE", "NAME"): "build_resnet_fpn_backbone",
    ("MODEL", "PROPOSAL_GENERATOR", "NAME"): "RPN",
    ("MODEL", "RPN", "HEAD_NAME"): "StandardRPNHead",
    ("MODEL", "ROI_MASK_HEAD", "NAME"): "MaskRCNNConvUpsampleHead",
}


def load_cfg(rel_path):
    from fpn_plugin.config import add_shapes_config, uses_shapes_dataset

    path = os.path.join(ROOT, "configs", rel_path)
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    if uses_shapes_dataset(path):  # the demo: the shapes dataset's keys come with it
        add_shapes_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def _get(cfg, path):
    for key in path:
        cfg = cfg[key]
    return cfg


def _set(cfg, path, value):
    for key in path[:-1]:
        cfg = cfg[key]
    cfg[path[-1]] = value


def _tiny_batch(num_images=1, size=64):
    torch.manual_seed(0)
    batch = []
    for _ in range(num_images):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 1])
        inst.gt_masks = PolygonMasks([[[8, 8, 40, 8, 40, 36, 8, 36]], [[30, 20, 60, 60, 30, 60]]])
        batch.append({"image": torch.randint(0, 256, (3, size, size)).float(),
                      "height": size, "width": size, "instances": inst})
    return batch


def test_every_config_is_tested():
    assert "Base-RCNN-CustomFPN.yaml" in CONFIGS
    for required in ZOO_TWINS:
        assert required in CONFIGS
    assert any(c.startswith("Demo/") for c in CONFIGS)


@pytest.mark.parametrize("rel_path", CONFIGS)
def test_config_builds_plugin_model_and_trains_one_step(rel_path):
    cfg = load_cfg(rel_path)
    # The components a config names must be fpn_plugin's (by registry entry).
    for path, registry in COMPONENT_KEYS:
        name = _get(cfg, path)
        if path[1] == "RPN" and cfg.MODEL.PROPOSAL_GENERATOR.NAME not in ("RPN", "PerLevelRPN"):
            continue
        if path[1] == "ROI_MASK_HEAD" and not cfg.MODEL.MASK_ON:
            continue
        assert registry.get(name).__module__.startswith("fpn_plugin."), (rel_path, path, name)
    # Tiny input; sampling sizes shrink with it, the architecture stays as configured.
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < 2:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    torch.manual_seed(0)
    model = build_model(cfg)
    # The built modules are the plugin's classes, not look-alikes from Detectron2.
    assert type(model.backbone).__module__.startswith("fpn_plugin."), type(model.backbone)
    assert type(model.proposal_generator).__module__.startswith("fpn_plugin.")
    if hasattr(model.proposal_generator, "rpn_head"):
        assert type(model.proposal_generator.rpn_head).__module__.startswith("fpn_plugin.")
    if cfg.MODEL.MASK_ON:
        assert type(model.roi_heads.mask_head).__module__.startswith("fpn_plugin.")
    model.train()
    optimizer = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with EventStorage(0):  # training-mode models log statistics to it
        losses = model(_tiny_batch())
    if cfg.MODEL.MASK_ON:
        assert "loss_mask" in losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("backbone.") for n in changed)
    assert any(n.startswith("proposal_generator.") for n in changed)
    if cfg.MODEL.MASK_ON:
        assert any(n.startswith("roi_heads.mask_head.") for n in changed)


def _zoo_cfg(zoo_path):
    from detectron2 import model_zoo

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_path))
    return cfg


def _flatten(node, prefix=()):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


@pytest.mark.parametrize("rel_path", sorted(ZOO_TWINS))
def test_coco_config_equals_detectron2_model_zoo(rel_path):
    ours = load_cfg(rel_path)
    theirs = _zoo_cfg(ZOO_TWINS[rel_path])
    ours_flat, theirs_flat = _flatten(ours), _flatten(theirs)
    differences = {}
    for key, value in theirs_flat.items():
        if key in BUILTIN_NAMES:
            assert value == BUILTIN_NAMES[key], key
            continue
        if ours_flat.get(key) != value:
            differences[".".join(key)] = (ours_flat.get(key), value)
    assert differences == {}
    # Plugin-only keys keep the defaults that reproduce Detectron2.
    plugin_defaults = _flatten(add_fpn_plugin_config(get_cfg()))
    for key in set(ours_flat) - set(theirs_flat):
        assert ours_flat[key] == plugin_defaults[key], key


def _calibrate_frozen_bn(model, inputs):
    """Set every FrozenBN's statistics to those of its input on ``inputs`` (in order)."""
    from detectron2.layers import FrozenBatchNorm2d

    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    handles = [m.register_forward_pre_hook(set_stats) for m in model.modules()
               if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()


def _random_detectron2_mask_rcnn():
    """Detectron2's own R50-FPN Mask R-CNN (the zoo config of our parity config) with seeded
    random weights (biases made non-zero, FrozenBN statistics calibrated), an input image, and
    our parity config with the same test settings."""
    zoo = _zoo_cfg(ZOO_TWINS["COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml"])
    ours = load_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml")
    for cfg in (zoo, ours):
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights score low; keep them all
        cfg.TEST.DETECTIONS_PER_IMAGE = 20
    torch.manual_seed(0)
    reference = build_model(zoo).eval()
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 160, 224)).float()
    inputs = [{"image": image, "height": 160, "width": 224}]
    # Non-zero biases everywhere, so a mis-mapped tensor shows up in the outputs ...
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    # ... and FrozenBN statistics that keep a randomly initialized ResNet's activations in
    # range (untouched, they grow ~1e4 and leave the RPN with a couple of proposals).
    _calibrate_frozen_bn(reference, inputs)
    return reference, inputs, ours


def _assert_same_detections(reference, model, inputs):
    with torch.no_grad():
        expected = reference(inputs)[0]["instances"]
        actual = model(inputs)[0]["instances"]
    assert len(expected) == 20  # a full set of detections to compare
    # The same computation, op for op: bit-identical detections.
    assert len(actual) == len(expected)
    assert torch.equal(actual.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(actual.scores, expected.scores)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    assert torch.equal(actual.pred_masks, expected.pred_masks)
    assert expected.pred_masks.any()


def test_parity_config_loads_a_random_detectron2_mask_rcnn_state_dict_with_same_detections(
        tmp_path):
    """A state dict of Detectron2's own R50-FPN Mask R-CNN (random weights, saved as .pth)
    loads strictly into our parity config and gives bit-identical detections. The file-format
    side of real model-zoo weights: test_parity_config_loads_a_model_zoo_pkl."""
    from detectron2.checkpoint import DetectionCheckpointer

    reference, inputs, ours = _random_detectron2_mask_rcnn()
    ckpt = str(tmp_path / "d2_mask_rcnn_R_50_FPN.pth")
    torch.save({"model": reference.state_dict()}, ckpt)
    model = build_model(ours).eval()
    # Same parameter names and shapes: a strict load of Detectron2's state dict succeeds ...
    model.load_state_dict(torch.load(ckpt)["model"], strict=True)
    # ... and the checkpointer users call loads the file the same way.
    model = build_model(ours).eval()
    DetectionCheckpointer(model).load(ckpt)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    _assert_same_detections(reference, model, inputs)


@pytest.mark.parametrize("matching_heuristics", [False, True],
                         ids=["zoo_layout", "zoo_layout_matching_heuristics"])
def test_parity_config_loads_a_model_zoo_pkl(tmp_path, matching_heuristics):
    """The file layout of Detectron2's model-zoo ``model_final_*.pkl`` (what docs/training.md
    points MODEL.WEIGHTS at): a latin-1 pickle of ``{"model": {name: numpy array},
    "__author__": "Detectron2 Model Zoo"}`` with Detectron2's parameter names (and, as in
    files converted from Caffe2, ``"matching_heuristics": True``, which renames by suffix).
    Loaded through the plugin's reading door and through Detectron2's checkpointer: the same
    weights and bit-identical detections as Detectron2's model."""
    import pickle

    from detectron2.checkpoint import DetectionCheckpointer

    from fpn_plugin.checkpoint import load_model_weights

    reference, inputs, ours = _random_detectron2_mask_rcnn()
    state = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    data = {"model": state, "__author__": "Detectron2 Model Zoo"}
    if matching_heuristics:
        data["matching_heuristics"] = True
    path = str(tmp_path / "model_final_0123ab.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)  # the zoo's files are protocol-2 pickles
    for load in (lambda m: load_model_weights(m, path, strict=True),
                 lambda m: DetectionCheckpointer(m).load(path)):
        model = build_model(ours).eval()
        load(model)
        loaded = model.state_dict()
        for name, value in reference.state_dict().items():
            assert torch.equal(loaded[name], value), name
        _assert_same_detections(reference, model, inputs)
