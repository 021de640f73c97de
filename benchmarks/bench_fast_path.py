#!/usr/bin/env python
"""
Accuracy and speed of the fast inference path (MODEL.FAST_INFERENCE) on a trained model.

One trained checkpoint, one held-out dataset, two passes over it:
  fp32   the model as trained (MODEL.FAST_INFERENCE off)
  fast   the same weights with enable_fast_inference(PRECISION, CHANNELS_LAST)
Both passes are scored by Detectron2's COCOEvaluator (box and mask AP). Speed is the median
per-image latency of the two, measured in ABBA order on a fixed subset of the images
(harness.compare), and peak tensor memory of one image.

By default it uses the demo's checkpoint and held-out split, so run `make demo` first:
  .venv/bin/python benchmarks/bench_fast_path.py
  .venv/bin/python benchmarks/bench_fast_path.py --precision bf16 --no-channels-last
  .venv/bin/python benchmarks/bench_fast_path.py --config-file CFG --weights W --dataset NAME
"""
import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import fpn_plugin  # noqa: E402,F401  (registers the plugin's components)
from fpn_plugin.config import load_config  # noqa: E402
from fpn_plugin.checkpoint import CheckpointError, SafeDetectionCheckpointer  # noqa: E402
from fpn_plugin.data.shapes import register_shapes_if_named  # noqa: E402
from fpn_plugin.evaluation import build_coco_evaluator, check_dataset_registered  # noqa: E402
from fpn_plugin.inference import enable_fast_inference  # noqa: E402
from fpn_plugin.utils.cli import exit_on_errors, quiet_third_party_noise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
DEMO_WEIGHTS = os.path.join(ROOT, "output", "demo", "model_final.pth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=DEMO_CONFIG)
    p.add_argument("--weights", default=DEMO_WEIGHTS, help="trained checkpoint (.pth or .pkl)")
    p.add_argument("--dataset", default=None, help="registered dataset (default: DATASETS.TEST[0])")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timing-images", type=int, default=8,
                   help="images timed per repeat (the first ones of the dataset)")
    p.add_argument("--repeats", type=int, default=7)
    harness.add_output_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return p.parse_args(argv)


def build_cfg(args):
    cfg = load_config(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.FAST_INFERENCE.PRECISION = "fp32"  # the fast path is switched on explicitly below
    cfg.MODEL.FAST_INFERENCE.CHANNELS_LAST = False
    cfg.freeze()
    return cfg


def evaluate(model, cfg, dataset):
    loader = build_detection_test_loader(cfg, dataset)
    evaluator = build_coco_evaluator(dataset, output_dir=None)
    results = inference_on_dataset(model, loader, evaluator)
    return {task: results[task]["AP"] for task in ("bbox", "segm")}, loader


def main(argv=None):
    quiet_third_party_noise()
    args = parse_args(argv)
    # Bad input (config, dataset, weights) ends with one "error: ..." line and exit status 2.
    with exit_on_errors(ValueError, FileNotFoundError, CheckpointError):
        run(args, argv)


def run(args, argv=None):
    setup_logger(name="fpn_plugin")
    logger = setup_logger(name="detectron2")
    logger.setLevel(logging.WARNING)  # keep inference_on_dataset's progress, drop the chatter
    logging.getLogger("detectron2.evaluation.evaluator").setLevel(logging.INFO)
    if not os.path.isfile(args.weights):
        sys.exit(f"bench_fast_path: --weights {args.weights} does not exist; train a model "
                 "first (`make demo` writes output/demo/model_final.pth)")
    cfg = build_cfg(args)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    register_shapes_if_named(cfg, [dataset])
    check_dataset_registered(dataset)  # before any model is built

    # Two model objects with the same weights, so neither pass pays for switching layouts.
    model_fp32 = build_model(cfg).eval()
    SafeDetectionCheckpointer(model_fp32).load(args.weights)
    model_fast = build_model(cfg).eval()
    model_fast.load_state_dict(model_fp32.state_dict())
    enable_fast_inference(model_fast, args.precision, channels_last=args.channels_last)

    with torch.no_grad():
        ap_fp32, loader = evaluate(model_fp32, cfg, dataset)
        ap_fast, _ = evaluate(model_fast, cfg, dataset)

        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == args.timing_images:
                break

        def run(model):
            return lambda: [model(batch) for batch in batches]

        timing = harness.compare(run(model_fast), run(model_fp32), warmup=1,
                                 repeats=args.repeats, device=args.device)
        memory = harness.compare_memory(lambda: model_fast(batches[0]),
                                        lambda: model_fp32(batches[0]), device=args.device)

    fast_name = args.precision + (" + channels_last" if args.channels_last else "")
    rows = [{"name": f"{len(batches)} images, inference", "unit": "s", "result": timing},
            {"name": "one image, peak tensor memory", "unit": "MiB", "result": memory}]
    ap_table = "\n".join([
        f"| {dataset} | fp32 | {fast_name} | difference |",
        "|---|---|---|---|",
        f"| box AP | {ap_fp32['bbox']:.2f} | {ap_fast['bbox']:.2f} | "
        f"{ap_fast['bbox'] - ap_fp32['bbox']:+.2f} |",
        f"| mask AP | {ap_fp32['segm']:.2f} | {ap_fast['segm']:.2f} | "
        f"{ap_fast['segm'] - ap_fp32['segm']:+.2f} |",
    ])
    command = "python benchmarks/bench_fast_path.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(harness.save("bench_fast_path", rows, command.strip(),
                       extra={"ap": {"fp32": ap_fp32, "fast": ap_fast}, "weights": args.weights,
                              "dataset": dataset, "fast_path": fast_name},
                       labels=(fast_name, "fp32"), notes=ap_table,
                       write_results=args.write_results))


if __name__ == "__main__":
    main()
