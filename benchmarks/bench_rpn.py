"""
Per-level RPN post-processing vs Detectron2's RPN, same inputs.

A (plugin): ``find_top_proposals_per_level`` (used by ``PerLevelRPN``) - top-k per level, then
ONE batched NMS for the whole batch keyed by (image, level), vectorised filtering and merge.
B (Detectron2): ``find_top_rpn_proposals`` (used by ``RPN``) - top-k per level, then a Python
loop over images with one batched NMS per image.

Both select from the same decoded boxes and logits (COCO-sized pyramid P2..P6 of an 800x1088
input, 3 anchors per position, random logits and small random deltas on the real anchors)
with Detectron2's Base-RCNN-FPN settings; before timing, the script checks that
``PerLevelRPN`` and ``RPN`` return the same proposals from them. A last row times the whole
proposal generator forward (head, anchors, decoding, selection; 64 channels to keep it short
on CPU).

Usage: .venv/bin/python benchmarks/bench_rpn.py [--repeats 15] [--threads N] [--device cpu]
Results: benchmarks/results/bench_rpn.{md,json}
"""
import argparse
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_arguments, compare, compare_memory, save  # noqa: E402

from fpn_plugin import add_fpn_plugin_config  # noqa: E402
from fpn_plugin.rpn.postprocess import find_top_proposals_per_level  # noqa: E402

LEVELS = ["p2", "p3", "p4", "p5", "p6"]


def build_pair(channels, device, pre, post):
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.MODEL.RPN.IN_FEATURES = list(LEVELS)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = pre
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = post
    shapes = {f: ShapeSpec(channels=channels, stride=2 ** (i + 2)) for i, f in enumerate(LEVELS)}
    builtin = build_proposal_generator(cfg, shapes)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PerLevelRPN"
    cfg.MODEL.RPN.HEAD_NAME = "PerLevelRPNHead"
    plugin = build_proposal_generator(cfg, shapes)
    with torch.no_grad():
        for p in builtin.parameters():
            p.normal_(0, 0.05)
    plugin.load_state_dict(builtin.state_dict())
    return plugin.to(device).eval(), builtin.to(device).eval()


def head_outputs(module, image_hw, num_images, device, seed=0):
    """Random logits and small random deltas on the real anchors of an image of image_hw."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    grid = [(-(-h // 2 ** (i + 2)), -(-w // 2 ** (i + 2))) for i in range(len(LEVELS))]
    fake = [torch.empty(1, 1, gh, gw, device=device) for gh, gw in grid]
    anchors = module.anchor_generator(fake)
    logits = [torch.randn(num_images, len(a), generator=g).to(device) for a in anchors]
    deltas = [(torch.randn(num_images, len(a), 4, generator=g) * 0.2).to(device) for a in anchors]
    return anchors, logits, deltas


def check_identical(a, b):
    """Same proposals and logits; exactly equal logits may come in either order."""
    for x, y in zip(a, b):
        assert torch.equal(x.objectness_logits, y.objectness_logits)
        bx, by = x.proposal_boxes.tensor, y.proposal_boxes.tensor
        if not torch.equal(bx, by):
            rows_x = torch.unique(torch.cat([x.objectness_logits[:, None], bx], 1), dim=0)
            rows_y = torch.unique(torch.cat([y.objectness_logits[:, None], by], 1), dim=0)
            assert torch.equal(rows_x, rows_y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    add_output_arguments(parser)
    args = parser.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    image_hw = (800, 1088)  # a COCO image at Detectron2's test scale, padded to /32
    for phase, pre, post, training, batches in (
        ("inference", 1000, 1000, False, (1, 2, 8)),
        ("training", 2000, 1000, True, (2,)),
    ):
        plugin, builtin = build_pair(256, dev, (pre, pre), (post, post))
        for num_images in batches:
            anchors, logits, deltas = head_outputs(builtin, image_hw, num_images, dev)
            with torch.no_grad():
                boxes = builtin._decode_proposals(anchors, deltas)  # shared by A and B
            sizes = [image_hw] * num_images

            def run_a():
                return find_top_proposals_per_level(
                    boxes, logits, sizes, 0.7, [pre] * len(LEVELS), post, None, 0.0, training
                )

            def run_b():
                return find_top_rpn_proposals(boxes, logits, sizes, 0.7, pre, post, 0.0, training)

            with torch.no_grad():
                for m in (plugin, builtin):
                    m.train(training)
                with EventStorage():  # training puts per-level statistics in the storage
                    check_identical(
                        plugin.predict_proposals(anchors, logits, deltas, sizes),
                        builtin.predict_proposals(anchors, logits, deltas, sizes),
                    )
                result = compare(
                    run_a, run_b, warmup=args.warmup, repeats=args.repeats, device=dev
                )
            name = (
                f"proposal selection, {phase} (pre {pre}/level, post {post}/image), "
                f"batch {num_images}"
            )
            rows.append({"name": name, "unit": "s", "result": result})
            print(name, f"ratio {result['ratio']:.3f}", flush=True)
            if num_images == 2 and not training:
                mem = compare_memory(run_a, run_b, device=dev)
                name = f"peak memory, proposal selection, {phase}, batch 2"
                rows.append({"name": name, "unit": "MiB", "result": mem})

    # Whole proposal generator (head + anchors + decode + selection), inference.
    plugin, builtin = build_pair(64, dev, (2000, 1000), (1000, 1000))
    num_images, hw = 2, (512, 672)
    g = torch.Generator().manual_seed(1)
    grid = [(-(-hw[0] // 2 ** (i + 2)), -(-hw[1] // 2 ** (i + 2))) for i in range(len(LEVELS))]
    features = {
        f: torch.randn(num_images, 64, gh, gw, generator=g).to(dev)
        for f, (gh, gw) in zip(LEVELS, grid)
    }
    images = ImageList(torch.zeros(num_images, 3, *hw, device=dev), [hw] * num_images)
    with torch.no_grad():
        check_identical(plugin(images, features)[0], builtin(images, features)[0])
        result = compare(
            lambda: plugin(images, features),
            lambda: builtin(images, features),
            warmup=args.warmup,
            repeats=args.repeats,
            device=dev,
        )
    name = "whole RPN forward, inference, 512x672, 64 ch, batch 2"
    rows.append({"name": name, "unit": "s", "result": result})
    print(name, f"ratio {result['ratio']:.3f}", flush=True)

    command = "python benchmarks/bench_rpn.py " + " ".join(sys.argv[1:])
    print(save("bench_rpn", rows, command.strip(), write_results=args.write_results))


if __name__ == "__main__":
    main()
