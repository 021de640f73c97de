#!/usr/bin/env python
"""
The plugin against Detectron2's built-ins, side by side, in one process.

Lines (A = plugin, B = Detectron2; same weights, same inputs, ABBA order, medians):
  neck       FPN neck forward on precomputed ResNet-50 features of an HxW image
  rpn_test   RPN head + proposal post-processing, test settings (eval mode)
  rpn_train  RPN head + anchor labelling/sampling + losses, train settings
  mask_head  mask head forward on 100 pooled ROIs (inference: logits + pasting prep)
  model      full Mask R-CNN R50-FPN inference on one HxW image
  train_iter one training iteration (forward, backward, SGD step) of Mask R-CNN R50-FPN
  fast       the plugin's fast path (MODEL.FAST_INFERENCE) against Detectron2's fp32 model
and the peak tensor memory of each (exact on CPU, see harness.peak_memory).

The models are randomly initialised (no weights can be downloaded here). To give them the
workload of a trained model, the RPN/box delta predictors are zeroed (proposals = anchors)
and the test score threshold is 0, so every image yields the full 1000 proposals and 100
detections with masks.

Usage:
  .venv/bin/python benchmarks/bench_models.py                 # CPU, all lines
  .venv/bin/python benchmarks/bench_models.py --device cuda --amp
  .venv/bin/python benchmarks/bench_models.py --only neck rpn_test --repeats 21
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, ImageList, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import fpn_plugin  # noqa: E402,F401  (registers the plugin's components)
from fpn_plugin import add_fpn_plugin_config  # noqa: E402
from fpn_plugin.inference import disable_fast_inference, enable_fast_inference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_CONFIG = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation",
                             "mask_rcnn_R_50_custom_fpn_1x.yaml")
D2_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
LINES = ["neck", "rpn_test", "rpn_train", "mask_head", "model", "train_iter", "fast"]


def build_pair(device):
    """Detectron2's R50-FPN Mask R-CNN and the plugin's parity config, with equal weights."""
    d2_cfg = get_cfg()
    d2_cfg.merge_from_file(model_zoo.get_config_file(D2_CONFIG))
    plugin_cfg = get_cfg()
    add_fpn_plugin_config(plugin_cfg)
    plugin_cfg.merge_from_file(PLUGIN_CONFIG)
    for cfg in (d2_cfg, plugin_cfg):
        cfg.MODEL.DEVICE = device
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    d2 = build_model(d2_cfg)
    for layer in (d2.proposal_generator.rpn_head.anchor_deltas, d2.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    plugin = build_model(plugin_cfg)
    plugin.load_state_dict(d2.state_dict(), strict=True)
    return plugin.eval(), d2.eval(), plugin_cfg


def synthetic_image(height, width, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=g) * 255).to(device)


def synthetic_targets(height, width, device, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = 32 + torch.rand(n, 2, generator=g) * torch.tensor([width * 0.25, height * 0.25])
    boxes = torch.cat([xy, xy + wh], dim=1)
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, 80, (n,), generator=g)
    inst.gt_masks = BitMasks(masks)
    return inst.to(device)


def autocast(device, amp):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def lines_for(plugin, d2, cfg, args):
    """name -> (fn_a, fn_b) pairs of zero-argument callables."""
    device, amp = args.device, args.amp
    h, w = args.size
    image = synthetic_image(h, w, device)
    inputs = [{"image": image, "height": h, "width": w}]
    targets = synthetic_targets(h, w, device)
    with torch.no_grad():
        images = d2.preprocess_image(inputs)
        bottom_up = d2.backbone.bottom_up(images.tensor)
        features = d2.backbone(images.tensor)

    def no_grad(fn):
        def run():
            with torch.no_grad(), autocast(device, amp):
                return fn()
        return run

    def neck(model):
        # The bottom-up ResNet is identical in both: feed its cached outputs to the neck.
        def run():
            model.backbone.bottom_up.forward = lambda x: bottom_up
            try:
                with torch.no_grad(), autocast(device, amp):
                    return model.backbone(images.tensor)
            finally:
                del model.backbone.bottom_up.forward  # back to the class method
        return run

    def rpn(model, train):
        def run():
            torch.manual_seed(0)
            model.proposal_generator.train(train)
            try:
                with EventStorage(), autocast(device, amp), torch.set_grad_enabled(train):
                    return model.proposal_generator(images, features, [targets] if train else None)
            finally:
                model.proposal_generator.eval()
        return run

    with torch.no_grad():
        proposals, _ = d2.proposal_generator(images, features)
        detections = d2.roi_heads(images, features, proposals)[0]
    mask_features = d2.roi_heads.mask_pooler(
        [features[f] for f in d2.roi_heads.mask_in_features], [x.pred_boxes for x in detections])

    def mask_head(model):
        def run():
            inst = [Instances(x.image_size, **x.get_fields()) for x in detections]
            with torch.no_grad(), autocast(device, amp):
                return model.roi_heads.mask_head(_mask_input(model, features, mask_features, inst), inst)
        return run

    def full(model):
        return no_grad(lambda: model(inputs))

    def train_iter(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the weights (and so the work) stay equal
        batch = [{"image": image, "height": h, "width": w, "instances": targets}]

        def run():
            torch.manual_seed(0)
            model.train()
            try:
                with EventStorage(), autocast(device, amp):
                    losses = model(batch)
                sum(losses.values()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                model.eval()
        return run

    def fast():
        return no_grad(lambda: plugin(inputs))

    return {
        "neck": (neck(plugin), neck(d2)),
        "rpn_test": (rpn(plugin, False), rpn(d2, False)),
        "rpn_train": (rpn(plugin, True), rpn(d2, True)),
        "mask_head": (mask_head(plugin), mask_head(d2)),
        "model": (full(plugin), full(d2)),
        "train_iter": (train_iter(plugin), train_iter(d2)),
        "fast": (fast(), full(d2)),
    }


def _mask_input(model, features, pooled, instances):
    """The mask head's input: pooled ROI features, or the feature dict when it pools itself."""
    if model.roi_heads.mask_pooler is None:
        return {f: features[f] for f in model.roi_heads.mask_in_features}
    return pooled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true",
                        help="autocast both sides (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=LINES, default=LINES)
    parser.add_argument("--fast-precision", default="bf16")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--name", default=None, help="results file name (default from device)")
    harness.add_output_arguments(parser)
    args = parser.parse_args()

    plugin, d2, cfg = build_pair(args.device)
    pairs = lines_for(plugin, d2, cfg, args)
    rows = []
    for name in args.only:
        fn_a, fn_b = pairs[name]
        if name == "fast":
            enable_fast_inference(plugin, args.fast_precision, channels_last=True)
        try:
            print(f"[bench] {name}: timing {args.repeats} x A/B after {args.warmup} warm-up ...",
                  flush=True)
            timing = harness.compare(fn_a, fn_b, args.warmup, args.repeats, args.device)
            rows.append({"name": f"{name} time", "unit": "s", "result": timing})
            print(f"[bench] {name}: plugin {timing['a'].median * 1e3:.1f} ms, "
                  f"Detectron2 {timing['b'].median * 1e3:.1f} ms, ratio {timing['ratio']:.3f}",
                  flush=True)
            if not args.no_memory:
                memory = harness.compare_memory(fn_a, fn_b, args.device)
                rows.append({"name": f"{name} peak memory", "unit": "MiB", "result": memory})
        finally:
            if name == "fast":
                disable_fast_inference(plugin)
    command = "python benchmarks/bench_models.py " + " ".join(sys.argv[1:])
    name = args.name or f"models_{args.device.split(':')[0]}{'_amp' if args.amp else ''}"
    print(harness.save(name, rows, command.strip(),
                       extra={"size": args.size, "fast_precision": args.fast_precision},
                       write_results=args.write_results))


if __name__ == "__main__":
    main()
