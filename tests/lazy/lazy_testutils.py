"""What the LazyConfig tests share: the config files, their Detectron2 twins, a cheap size for
training steps, a tiny batch, and plain comparable forms of configs and module trees."""
import copy
import glob
import os

import torch
from detectron2.config import LazyConfig
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.registry import _convert_target_to_string
from omegaconf import DictConfig, ListConfig, OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_ROOT = os.path.join(ROOT, "configs")
# Every LazyConfig file under configs/, relative to it.
CONFIGS = sorted(os.path.relpath(p, CONFIG_ROOT)
                 for p in glob.glob(os.path.join(CONFIG_ROOT, "**", "*.py"), recursive=True))
# Our twin -> Detectron2's model-zoo recipe it reproduces.
ZOO_TWINS = {"common/models/mask_rcnn_custom_fpn.py": "common/models/mask_rcnn_fpn.py"}
ZOO_TWINS.update({
    f"new_baselines/mask_rcnn_R_{depth}_custom_FPN_{ep}ep_LSJ.py":
        f"new_baselines/mask_rcnn_R_{depth}_FPN_{ep}ep_LSJ.py"
    for depth, eps in ((50, (50, 100, 200, 400)), (101, (100, 200, 400))) for ep in eps
})
# The plugin's variants of the R50 100ep twin.
VARIANTS = sorted(c for c in CONFIGS if c.startswith("new_baselines/") and c not in ZOO_TWINS)
DEMO_LAZY = "Demo/mask_rcnn_R_18_custom_fpn_shapes.py"


def load(rel_path):
    return LazyConfig.load(os.path.join(CONFIG_ROOT, rel_path))


def plain(node):
    """A config node as plain Python data, with callables written as LazyConfig.save writes
    them (dotted names): what a saved and re-loaded config holds."""
    node = copy.deepcopy(node)
    _targets_to_strings(node)
    return OmegaConf.to_container(node, resolve=False)


def _targets_to_strings(node):
    if isinstance(node, DictConfig):
        for key in list(node.keys()):
            if OmegaConf.is_interpolation(node, key):
                continue
            value = node[key]
            if key == "_target_" and callable(value):
                node[key] = _convert_target_to_string(value)
            else:
                _targets_to_strings(value)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_interpolation(node, i):
                _targets_to_strings(node[i])


def differing_paths(a, b, prefix=""):
    """Dotted paths where two plain containers differ (a key on one side only counts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(path)
            else:
                out += differing_paths(a[key], b[key], path)
        return out
    return [] if a == b else [prefix]


def _small(value, limit):
    if value is None:
        return None
    if isinstance(value, int):
        return min(value, limit)
    return [min(v, limit) for v in value]


def shrink(model):
    """
    Cheap sizes for a training step, in place: ResNet-18, 32-channel pyramid, narrow heads,
    fewer proposals and sampled ROIs. The architecture stays what the config says otherwise
    (norms, head layouts, variant options, the number of levels and convs).
    """
    stages = model.backbone.bottom_up.stages
    if stages.depth != 18:
        stages.depth = 18
        stages.pop("stride_in_1x1", None)  # ResNet-18's basic blocks have no 1x1 conv
    model.backbone.out_channels = 32
    rpn = model.proposal_generator
    rpn.head.in_channels = 32
    rpn.pre_nms_topk = [_small(k, 200) for k in rpn.pre_nms_topk]
    rpn.post_nms_topk = [_small(k, 50) for k in rpn.post_nms_topk]
    if rpn.get("post_nms_topk_per_level") is not None:
        rpn.post_nms_topk_per_level = [_small(k, 50) for k in rpn.post_nms_topk_per_level]
    heads = model.roi_heads
    heads.batch_size_per_image = 32
    heads.box_head.input_shape.channels = 32
    heads.box_head.conv_dims = [16] * len(heads.box_head.conv_dims)
    heads.box_head.fc_dims = [64] * len(heads.box_head.fc_dims)
    heads.box_predictor.input_shape.channels = 64
    heads.mask_head.input_shape.channels = 32
    heads.mask_head.conv_dims = [16] * len(heads.mask_head.conv_dims)
    return model


def for_cpu(cfg):
    """A GPU recipe's train settings for this machine (in place)."""
    cfg.train.device = "cpu"
    cfg.train.amp.enabled = False
    return cfg


def tiny_batch(num_images=2, size=64, seed=0):
    """Images of ``size`` px with two objects each (boxes, classes, polygon masks)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        inst = Instances((size, size))
        s = size / 64
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]]) * s)
        inst.gt_classes = torch.tensor([0, 1])
        box = [8 * s, 8 * s, 40 * s, 8 * s, 40 * s, 36 * s, 8 * s, 36 * s]
        triangle = [30 * s, 20 * s, 60 * s, 60 * s, 30 * s, 60 * s]
        inst.gt_masks = PolygonMasks([[box], [triangle]])
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float(),
                      "height": size, "width": size, "instances": inst})
    return batch


_PLAIN = (bool, int, float, str, type(None))


def _plain_value(value):
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _PLAIN) and _plain_value(v) for k, v in value.items())
    return False


def settings(module):
    """A module's own plain settings (ints, floats, strings and containers of them: top-k,
    thresholds, batch sizes, strides, feature names, ...), for comparing two models beyond
    their parameters."""
    out = {}
    for k, v in vars(module).items():
        if isinstance(v, (DictConfig, ListConfig)):  # a LazyConfig list passed through as is
            v = OmegaConf.to_container(v)
        if k not in ("training", "_is_full_backward_hook") and _plain_value(v):
            out[k] = v
    return out
