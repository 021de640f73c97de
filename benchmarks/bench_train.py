#!/usr/bin/env python
"""
Training speed and memory of the fast training path against Detectron2's trainers.

One training iteration = the loop's ``run_step()``: forward, losses, backward, optimizer step
(Detectron2's ``SimpleTrainer`` / ``AMPTrainer``, the plugin's ``make_train_loop``). A and B
are two model objects with equal weights, fed the same batches, timed in one process in ABBA
order after warm-up (harness.compare: medians and interquartile spread); peak tensor memory of
one iteration each (harness.peak_memory; exact on CPU). The learning rate is 0, so the
weights, and with them the work per iteration, stay the same throughout.

Models (--models):
  r50   Mask R-CNN R50-FPN at HxW (default 800x1333), batch 2 (--batch): B is Detectron2's own
        model (COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml), A the plugin's parity
        config with B's weights loaded strictly. Randomly initialised (nothing downloadable
        here) with zeroed delta predictors, 8 boxes + masks per image.
  demo  the demo's model (configs/Demo, R18 + the plugin's FPN/RPN/mask head, BN), batch 4
        of the demo's 256 px shapes images (fpn_plugin.data.shapes, fixed seeds); A and B
        are both that model, B trained by Detectron2's fp32 SimpleTrainer.

A variants (--variants): fp32, fp32+cl, bf16, bf16+cl, fp16, fp16+cl ("+cl" = channels-last,
SOLVER.CHANNELS_LAST); fp16 needs CUDA. Baselines (--baseline): d2-fp32 (Detectron2's
SimpleTrainer, fp32), d2-amp (Detectron2's AMPTrainer: fp16 autocast around the whole
forward + GradScaler; CUDA only). --profile adds the ops that dominate one iteration of each.

  .venv/bin/python benchmarks/bench_train.py                        # CPU: bf16+cl vs fp32
  .venv/bin/python benchmarks/bench_train.py --variants fp32+cl bf16 bf16+cl --profile
  .venv/bin/python benchmarks/bench_train.py --device cuda --baseline d2-amp \\
      --variants fp32 fp16+cl bf16+cl
"""
import argparse
import itertools
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import AMPTrainer, SimpleTrainer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import fpn_plugin  # noqa: E402,F401  (registers the plugin's components)
from fpn_plugin.config import load_config  # noqa: E402
from fpn_plugin.data.shapes import shapes_training_input  # noqa: E402
from fpn_plugin.engine.precision import enable_fast_training, make_train_loop  # noqa: E402
from fpn_plugin.utils.cli import quiet_third_party_noise  # noqa: E402

ROOT = harness.ROOT
PLUGIN_R50 = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation",
                          "mask_rcnn_R_50_custom_fpn_1x.yaml")
D2_R50 = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
VARIANTS = ["fp32", "fp32+cl", "bf16", "bf16+cl", "fp16", "fp16+cl"]
BASELINES = ["d2-fp32", "d2-amp"]


def parse_variant(name: str):
    precision, _, layout = name.partition("+")
    return precision, layout == "cl"


# --- models and batches ---------------------------------------------------------------------

def r50_models(device):
    """Detectron2's R50-FPN Mask R-CNN (B) and the plugin's parity model (A), equal weights."""
    d2_cfg = get_cfg()
    d2_cfg.merge_from_file(model_zoo.get_config_file(D2_R50))
    d2_cfg.MODEL.DEVICE, d2_cfg.MODEL.WEIGHTS = device, ""
    plugin_cfg = load_config(PLUGIN_R50, ["MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    d2 = build_model(d2_cfg)
    for layer in (d2.proposal_generator.rpn_head.anchor_deltas, d2.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)

    def plugin():
        model = build_model(plugin_cfg)
        model.load_state_dict(d2.state_dict(), strict=True)
        return model

    return plugin, d2


def demo_models(device):
    """The demo's model twice (A and B), equal weights."""
    cfg = load_config(DEMO_CONFIG, ["MODEL.DEVICE", device])
    torch.manual_seed(0)
    reference = build_model(cfg)

    def copy():
        model = build_model(cfg)
        model.load_state_dict(reference.state_dict(), strict=True)
        return model

    return copy, reference


def synthetic_instance(height, width, seed, num_classes=80, n=8):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = 32 + torch.rand(n, 2, generator=g) * torch.tensor([width * 0.25, height * 0.25])
    boxes = torch.cat([xy, xy + wh], dim=1).clamp(max=torch.tensor([width, height] * 2) - 1)
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
    inst.gt_masks = BitMasks(masks)
    image = (torch.rand(3, height, width, generator=g) * 255).round()
    return {"image": image, "height": height, "width": width, "instances": inst}


def r50_batches(size, batch):
    h, w = size
    return [[synthetic_instance(h, w, seed=i) for i in range(batch)]]


def demo_batches(batch, num_batches=4, size=256):
    return [[shapes_training_input(size, seed=b * batch + i) for i in range(batch)]
            for b in range(num_batches)]


def to_device(batches, device):
    return [[{**r, "image": r["image"].to(device), "instances": r["instances"].to(device)}
             for r in batch] for batch in batches]


# --- loops ----------------------------------------------------------------------------------

def _optimizer(model):
    # lr 0: the weights, and so the work per iteration, stay the same for the whole benchmark.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0,
                           momentum=0.9)


def plugin_loop(model, batches, variant):
    precision, channels_last = parse_variant(variant)
    enable_fast_training(model, precision, channels_last)
    return make_train_loop(model, itertools.cycle(batches), _optimizer(model), precision)


def detectron2_loop(model, batches, baseline):
    cls = AMPTrainer if baseline == "d2-amp" else SimpleTrainer
    return cls(model, itertools.cycle(batches), _optimizer(model))


def step(loop):
    return loop.run_step


# --- profile --------------------------------------------------------------------------------

def top_ops(fn, device, n=12) -> List[Dict[str, object]]:
    """The ops with the most self time in one call of ``fn`` (share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if str(device).startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    cuda = str(device).startswith("cuda")

    def self_time(e):
        return (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) \
            if cuda else e.self_cpu_time_total

    total = sum(self_time(e) for e in events) or 1
    ranked = sorted(events, key=self_time, reverse=True)[:n]
    return [{"op": e.key, "ms": self_time(e) / 1e3, "share": self_time(e) / total,
             "calls": e.count} for e in ranked]


def format_profile(title, ops) -> str:
    lines = [f"**{title}**", "", "| op | self time | share | calls |", "|---|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['ms']:.1f} ms | {o['share']:.1%} | {o['calls']} |" for o in ops]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", choices=["r50", "demo"], default=["r50", "demo"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="plugin loops to time (default: bf16+cl on CPU; fp32, fp16+cl, bf16+cl "
                        "on CUDA)")
    p.add_argument("--baseline", choices=BASELINES, default="d2-fp32")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"),
                   help="r50 image size")
    p.add_argument("--batch", type=int, default=None, help="images per iteration "
                   "(default: 2 for r50, 4 for demo, the demo config's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also record the ops that dominate one iteration of A and B")
    p.add_argument("--name", default=None, help="results file name (default: train_<device>)")
    harness.add_output_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    quiet_third_party_noise()
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.baseline == "d2-amp" and not cuda:
        raise SystemExit("bench_train: --baseline d2-amp is Detectron2's AMPTrainer, CUDA only")
    variants = args.variants or (["fp32", "fp16+cl", "bf16+cl"] if cuda else ["bf16+cl"])
    for v in variants:
        if v.startswith("fp16") and not cuda:
            raise SystemExit(f"bench_train: variant {v} needs --device cuda")
    rows, profiles = [], []
    with EventStorage():  # the loops write their losses into it, as in training
        for model_name in args.models:
            if model_name == "r50":
                make_a, model_b = r50_models(args.device)
                batches = r50_batches(args.size, args.batch or 2)
                what = f"R50-FPN {args.size[0]}x{args.size[1]}, batch {len(batches[0])}"
            else:
                make_a, model_b = demo_models(args.device)
                batches = demo_batches(args.batch or 4)
                what = f"demo R18-FPN 256x256, batch {len(batches[0])}"
            batches = to_device(batches, args.device)
            loop_b = detectron2_loop(model_b, batches, args.baseline)
            for variant in variants:
                loop_a = plugin_loop(make_a(), batches, variant)
                label = f"{what}: {variant} vs {args.baseline}"
                print(f"[bench] {label}: timing {args.repeats} x A/B after {args.warmup} "
                      "warm-up iterations ...", flush=True)
                timing = harness.compare(step(loop_a), step(loop_b), args.warmup, args.repeats,
                                         args.device)
                rows.append({"name": f"{label}, s/iter", "unit": "s", "result": timing})
                print(f"[bench] {label}: {timing['a'].median:.3f} s vs "
                      f"{timing['b'].median:.3f} s per iteration: {1 / timing['ratio']:.2f}x "
                      f"faster (IQR {timing['a'].spread:.1%} / {timing['b'].spread:.1%})",
                      flush=True)
                if not args.no_memory:
                    memory = harness.compare_memory(step(loop_a), step(loop_b), args.device)
                    rows.append({"name": f"{label}, peak memory", "unit": "MiB",
                                 "result": memory})
                    print(f"[bench] {label}: peak memory {memory['a'] / 2**20:.0f} vs "
                          f"{memory['b'] / 2**20:.0f} MiB", flush=True)
                if args.profile:
                    profiles.append(format_profile(f"{what}, {variant}", top_ops(step(loop_a),
                                                                                  args.device)))
                del loop_a
            if args.profile:
                profiles.append(format_profile(f"{what}, {args.baseline}",
                                               top_ops(step(loop_b), args.device)))
            del loop_b, model_b
    speedups = "; ".join(f"{r['name'].rsplit(',', 1)[0]}: **{1 / r['result']['ratio']:.2f}x** "
                         "faster" for r in rows if r["unit"] == "s")
    notes = (f"Speed-up = B median / A median per iteration ({speedups}). Ratio < 1 means the "
             "fast path is faster or leaner. Learning rate 0 (the work per iteration stays "
             "constant); same weights and batches for A and B.")
    if profiles:
        notes += "\n\nOps with the most self time in one iteration:\n\n" + "\n\n".join(profiles)
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = args.name or f"train_{args.device.split(':')[0]}"
    print(harness.save(name, rows, command.strip(),
                       extra={"variants": variants, "baseline": args.baseline,
                              "size": args.size, "models": args.models},
                       labels=("fast training path (A)", f"Detectron2 {args.baseline} (B)"),
                       notes=notes, write_results=args.write_results))


if __name__ == "__main__":
    main()
