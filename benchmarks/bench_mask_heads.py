"""
Mask AP of the parity mask head vs PANet's mask head, trained the same way.

Trains a small Mask R-CNN (ResNet-18 FPN from scratch) once per head, with the same seed, the
same iterations, the same batches (the data order and augmentations are seeded) and the same
initial weights for everything but the mask head, on the embedded shapes dataset; evaluates
box and mask AP on its val split with pycocotools (Detectron2's COCOEvaluator); prints a table
and writes it to JSON.

    .venv/bin/python benchmarks/bench_mask_heads.py                  # defaults: 1 seed
    .venv/bin/python benchmarks/bench_mask_heads.py --iters 2000 --num-train 400 --num-val 100
    .venv/bin/python benchmarks/bench_mask_heads.py --timing-only --heads parity panet

With --write-results the tables also go to the tracked benchmarks/results/
(bench_mask_heads.{json,md} for AP, bench_mask_heads_timing.{json,md} for --timing-only) and
to the README/docs blocks that quote them.

The backbone and RPN are fpn_plugin's (``build_resnet_custom_fpn_backbone``, ``PerLevelRPN``)
when they are registered, Detectron2's built-ins otherwise (``--components`` forces one);
the table records which.
"""
import argparse
import json
import logging
import os
import sys
import time

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.layers import ShapeSpec
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import BACKBONE_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # harness.py

from fpn_plugin import add_fpn_plugin_config, has_compiled_ops  # noqa: E402
from harness import add_output_arguments, compare, environment, save, write_payload  # noqa: E402

logger = logging.getLogger("bench_mask_heads")

# Head variants compared: ROI_MASK_HEAD overrides on top of the shared config.
HEADS = {
    "parity": {"NAME": "ConvUpsampleMaskHead", "POOLER_TYPE": "ROIAlignV2"},
    "panet": {"NAME": "PANetMaskHead", "POOLER_TYPE": ""},  # adaptive pooling + fused fc
    "panet_pool": {"NAME": "PANetMaskHead", "POOLER_TYPE": "", "PANET.FUSED_FC": False},
    "panet_fc": {
        "NAME": "PANetMaskHead",
        "POOLER_TYPE": "ROIAlignV2",
        "PANET.ADAPTIVE_POOLING": False,
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--heads", nargs="+", default=["parity", "panet"], choices=sorted(HEADS))
    p.add_argument("--iters", type=int, default=500, help="training iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per head per seed")
    p.add_argument("--batch", type=int, default=4, help="images per iteration")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--components", choices=["auto", "plugin", "detectron2"], default="auto",
                   help="backbone/RPN: fpn_plugin's, Detectron2's, or the plugin's if registered")
    p.add_argument("--data-root", default=os.path.join(REPO, "datasets", "generated",
                                                        "shapes_bench_mask_heads"))
    p.add_argument("--output", default=os.path.join(REPO, "output", "bench_mask_heads"))
    # One thread: on a shared 2-core machine two OpenMP threads competing with other
    # processes run several times slower than one.
    p.add_argument("--timing-only", action="store_true",
                   help="only time pooling + mask head forward/backward (no training)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    add_output_arguments(p)
    return p.parse_args(argv)


def register_dataset(args):
    """Register the shapes train/val splits; returns (train name, val name)."""
    from fpn_plugin.data.shapes import register_shapes_dataset

    names = register_shapes_dataset(
        args.data_root,
        prefix="bench_mask_heads_shapes",
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=0,
    )
    return names[0], names[1]


def plugin_components_registered():
    return (
        "build_resnet_custom_fpn_backbone" in BACKBONE_REGISTRY._obj_map
        and "PerLevelRPN" in PROPOSAL_GENERATOR_REGISTRY._obj_map
    )


def lr_steps(iters):
    """LR drops (x0.1) at 75% and 92% of training, as the 1x schedule does (60k, 80k of 90k)."""
    return tuple(sorted({s for s in (int(iters * 0.75), int(iters * 0.92)) if 0 < s < iters}))


def build_cfg(args, head, seed, train_name, val_name):
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    use_plugin = args.components == "plugin" or (
        args.components == "auto" and plugin_components_registered()
    )
    if use_plugin:
        cfg.merge_from_file(os.path.join(REPO, "configs", "Base-RCNN-CustomFPN.yaml"))
    else:
        # The same architecture from Detectron2's built-ins (Base-RCNN-FPN.yaml's values).
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
        cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    s = args.image_size
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.MASK_ON", True,
        "MODEL.BACKBONE.FREEZE_AT", 0,  # from scratch: every stage learns
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.FPN.OUT_CHANNELS", 64,
        # Shapes are 9-50% of the image side.
        "MODEL.ANCHOR_GENERATOR.SIZES", [[s // 16], [s // 8], [s // 4], [s // 2], [s]],
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 600,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 300,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 300,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
        "MODEL.ROI_HEADS.NUM_CLASSES", 4,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 256,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 64,
        "INPUT.MIN_SIZE_TRAIN", (s,),
        "INPUT.MAX_SIZE_TRAIN", s,
        "INPUT.MIN_SIZE_TEST", s,
        "INPUT.MAX_SIZE_TEST", s,
        "DATASETS.TRAIN", (train_name,),
        "DATASETS.TEST", (val_name,),
        "DATALOADER.NUM_WORKERS", 0,  # one process: batches and flips follow the seed exactly
        "SOLVER.IMS_PER_BATCH", args.batch,
        "SOLVER.BASE_LR", args.lr,
        "SOLVER.MAX_ITER", args.iters,
        "SOLVER.WARMUP_ITERS", min(100, args.iters // 5),
        "SOLVER.STEPS", lr_steps(args.iters),
        "TEST.DETECTIONS_PER_IMAGE", 20,
        "SEED", seed,
        "VIS_PERIOD", 0,
    ])
    for key, value in HEADS[head].items():
        cfg.merge_from_list([f"MODEL.ROI_MASK_HEAD.{key}", value])
    cfg.freeze()
    return cfg, use_plugin


def train(cfg, seed, model=None, on_step=None, precision="fp32"):
    """
    Plain training loop (no hooks, no checkpoints); returns (model, seconds, last losses).

    Args:
        cfg: frozen config (``SOLVER.OPTIMIZER`` picks SGD or AdamW, as the plugin's trainer).
        seed (int): seeds model init (when ``model`` is None), ROI sampling, the data order
            and the augmentations.
        model: an already-built model to train (e.g. with weights copied from another run's
            model); every RNG is then re-seeded with ``seed`` after building, so two runs with
            different models still draw the same batches, flips and first ROI samples.
        on_step: called after each iteration as ``on_step(it, total_loss, losses, batch)``.
        precision: "fp32", or "bf16" to run the forward under ``torch.autocast`` (weights,
            gradients and optimizer stay fp32).
    """
    from fpn_plugin.engine.trainer import build_optimizer_for

    # Model init, ROI sampling, data augmentation. A given model was built before this, so its
    # random draws (as many as its modules need) cannot shift the streams below: runs of
    # different models then start batches, flips and ROI sampling from one state.
    seed_all_rng(seed)
    if model is None:
        model = build_model(cfg)
    optimizer = build_optimizer_for(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    from detectron2.data import DatasetCatalog

    num_images = len(DatasetCatalog.get(cfg.DATASETS.TRAIN[0]))
    loader = build_detection_train_loader(
        cfg, sampler=TrainingSampler(num_images, shuffle=True, seed=seed)
    )
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device_type = str(cfg.MODEL.DEVICE).split(":")[0]
    model.train()
    start = time.perf_counter()
    last = {}
    with EventStorage(0) as storage:
        for it, batch in zip(range(cfg.SOLVER.MAX_ITER), loader):
            storage.iter = it
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                losses = model(batch)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss became {total.item()} at iteration {it}: {losses}")
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            scheduler.step()
            last = {k: round(v.item(), 4) for k, v in losses.items()}
            if on_step is not None:
                on_step(it, total.item(), last, batch)
            if it % 50 == 0 or it == cfg.SOLVER.MAX_ITER - 1:
                logger.info(f"iter {it}: total {total.item():.3f} {last}")
    return model, time.perf_counter() - start, last


def evaluate(cfg, model, output_dir):
    try:
        from fpn_plugin.evaluation.coco import build_coco_evaluator

        evaluator = build_coco_evaluator(cfg.DATASETS.TEST[0], output_dir)
    except ImportError:
        evaluator = COCOEvaluator(
            cfg.DATASETS.TEST[0], output_dir=output_dir, use_fast_impl=has_compiled_ops()
        )
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    results = inference_on_dataset(model, loader, evaluator)
    # COCOEvaluator reports NaN when a model predicts nothing; JSON has no NaN, so None.
    return {
        task: {k: (round(float(v), 2) if v == v else None) for k, v in results[task].items()}
        for task in results
    }


def _fmt(value, width):
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.2f}"


def time_heads(args, num_rois=64):
    """
    Time ROI pooling + mask head forward and backward (one training step's mask branch) for
    each head vs the parity head, on a random pyramid shaped like the AP runs' (batch
    ``--batch``, FPN width 64) with ``num_rois`` random boxes; the harness alternates A and B.
    """
    from detectron2.modeling.roi_heads import build_roi_heads
    from detectron2.structures import Boxes, Instances

    s, n = args.image_size, args.batch
    gen = torch.Generator().manual_seed(0)
    features = {
        f"p{i}": torch.randn(n, 64, s // 2**i, s // 2**i, generator=gen) for i in range(2, 7)
    }
    xy = torch.rand(num_rois, 2, generator=gen) * s * 0.7
    wh = (torch.rand(num_rois, 2, generator=gen) * 0.4 + 0.09) * s
    boxes = torch.cat([xy, (xy + wh).clamp(max=s - 1)], dim=1)
    per_image = boxes.split([num_rois // n] * n)
    instances = []
    for b in per_image:
        inst = Instances((s, s))
        inst.pred_boxes = Boxes(b)
        inst.pred_classes = torch.randint(4, (len(b),), generator=gen)
        instances.append(inst)

    def mask_branch(head_name):
        cfg, _ = build_cfg(args, head_name, 0, "unused_train", "unused_val")
        shapes = {f: ShapeSpec(channels=64, stride=2 ** int(f[1])) for f in features}
        roi_heads = build_roi_heads(cfg, shapes).eval()

        def step():
            # Inference-mode module (pred_boxes) but with autograd on: forward + backward.
            out = roi_heads._forward_mask(features, [i[:] for i in instances])
            sum(o.pred_masks.sum() for o in out).backward()

        return step

    rows = []
    baseline = mask_branch("parity")
    for head in args.heads:
        if head == "parity":
            continue
        result = compare(mask_branch(head), baseline, warmup=3, repeats=15)
        rows.append({"name": f"{head}: ROI pooling + mask head forward and backward, "
                             f"{num_rois} ROIs", "unit": "s", "result": result})
        print(f"{head} vs parity, {num_rois} ROIs, pooling + head fwd+bwd: "
              f"{result['a'].median * 1e3:.1f} ms vs {result['b'].median * 1e3:.1f} ms "
              f"(x{result['ratio']:.2f}; IQR {result['a'].spread:.0%} / {result['b'].spread:.0%})")
    print(save("bench_mask_heads_timing", rows, _command(), labels=("variant", "parity head"),
               write_results=args.write_results))
    return rows


def _command():
    return "python " + " ".join([os.path.relpath(os.path.abspath(__file__), REPO)]
                                + sys.argv[1:])


def render(payload):
    """The markdown of the AP comparison (bench_mask_heads.json)."""
    env = payload["environment"]
    runs = payload["runs"]
    lines = [
        f"Command: `{payload['command']}`  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Date: {payload['date']}",
        "",
        f"Backbone/RPN: {payload['components']}; shapes dataset at "
        f"{payload['dataset']['image_size']} px, {payload['dataset']['train']} train / "
        f"{payload['dataset']['val']} held-out images; batch {payload['batch']}, "
        f"{runs[0]['iters'] if runs else 0} iterations.",
        "",
        "| head | seed | mask AP | mask AP50 | mask AP75 | box AP | mask AP - box AP | "
        "mask-head params |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ap(value):
        return "n/a" if value is None else f"{value:.2f}"

    for r in runs:
        gap = (None if r["segm_AP"] is None or r["bbox_AP"] is None
               else r["segm_AP"] - r["bbox_AP"])
        lines.append(f"| {r['head']} (`{r['mask_head']}`) | {r['seed']} | {ap(r['segm_AP'])} | "
                     f"{ap(r['segm_AP50'])} | {ap(r['segm_AP75'])} | {ap(r['bbox_AP'])} | "
                     f"{ap(gap)} | {r['mask_head_params'] / 1e6:.2f} M |")
    heads = list(dict.fromkeys(r["head"] for r in runs))
    if len(runs) > len(heads):
        for head in heads:
            rs = [r for r in runs if r["head"] == head]
            mean = {k: sum(r[k] or 0.0 for r in rs) / len(rs)  # no predictions: AP 0
                    for k in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")}
            lines.append(f"| **mean, {head}** | | **{mean['segm_AP']:.2f}** | "
                         f"{mean['segm_AP50']:.2f} | {mean['segm_AP75']:.2f} | "
                         f"{mean['bbox_AP']:.2f} | {mean['segm_AP'] - mean['bbox_AP']:.2f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing_only:
        return time_heads(args)
    os.makedirs(args.output, exist_ok=True)
    train_name, val_name = register_dataset(args)

    rows = []
    for seed in args.seeds:
        for head in args.heads:
            cfg, use_plugin = build_cfg(args, head, seed, train_name, val_name)
            logger.info(f"training head={head} seed={seed} iters={args.iters}")
            model, seconds, last = train(cfg, seed)
            metrics = evaluate(cfg, model, os.path.join(args.output, f"{head}_seed{seed}"))
            rows.append({
                "head": head,
                "mask_head": cfg.MODEL.ROI_MASK_HEAD.NAME,
                "overrides": HEADS[head],
                "seed": seed,
                "iters": args.iters,
                "train_seconds": round(seconds, 1),
                "segm_AP": metrics["segm"]["AP"],
                "segm_AP50": metrics["segm"]["AP50"],
                "segm_AP75": metrics["segm"]["AP75"],
                "bbox_AP": metrics["bbox"]["AP"],
                "mask_head_params": sum(
                    p.numel() for p in model.roi_heads.mask_head.parameters()
                ),
                "final_losses": last,
                "metrics": metrics,
            })
            logger.info(f"head={head} seed={seed}: segm AP {metrics['segm']['AP']}, "
                        f"bbox AP {metrics['bbox']['AP']}, {seconds:.0f}s")

    summary = {
        "command": _command(),
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d"),
        "components": "fpn_plugin" if use_plugin else "detectron2 built-in",
        "dataset": {"train": args.num_train, "val": args.num_val, "image_size": args.image_size},
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
    }
    path = os.path.join(args.output, "results.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)

    header = f"{'head':<11} {'seed':>4} {'iters':>5} {'mask AP':>8} {'AP50':>6} {'AP75':>6} " \
             f"{'box AP':>7} {'params':>8} {'time s':>7}"
    print(f"\nbackbone/RPN: {summary['components']}; shapes {args.image_size}px, "
          f"{args.num_train} train / {args.num_val} val images")
    print(header)
    for r in rows:
        print(f"{r['head']:<11} {r['seed']:>4} {r['iters']:>5} {_fmt(r['segm_AP'], 8)} "
              f"{_fmt(r['segm_AP50'], 6)} {_fmt(r['segm_AP75'], 6)} {_fmt(r['bbox_AP'], 7)} "
              f"{r['mask_head_params']:>8} {r['train_seconds']:>7.1f}")
    if len(args.seeds) > 1:
        print("\nmean over seeds:")
        for head in args.heads:
            rs = [r for r in rows if r["head"] == head]
            mask_ap = [r["segm_AP"] or 0.0 for r in rs]  # no predictions counts as AP 0
            box_ap = [r["bbox_AP"] or 0.0 for r in rs]
            print(f"{head:<11} mask AP {sum(mask_ap) / len(rs):.2f}  "
                  f"box AP {sum(box_ap) / len(rs):.2f}")
    print(f"\nwritten: {path}")
    write_payload("bench_mask_heads", summary, render(summary), args.write_results)
    return summary


if __name__ == "__main__":
    main()
