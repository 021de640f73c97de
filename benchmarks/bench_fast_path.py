#!/usr/bin/env python
"""
Accuracy and speed of the fast inference path (MODEL.FAST_INFERENCE) on a trained model.

One trained checkpoint, one held-out dataset, one pass over it per variant:
  fp32       the model as trained (MODEL.FAST_INFERENCE off): the reference (B)
  VARIANT    the same weights with enable_fast_inference(PRECISION, CHANNELS_LAST), for each
             of --variants ("bf16+cl" = bf16 with channels_last, "fp32+cl", "bf16", ...;
             "auto" = what MODEL.FAST_INFERENCE.PRECISION "auto" picks on this machine, named
             with its choice: bf16 where the CPU computes bf16 natively, else fp32 channels-last)
Every pass is scored by Detectron2's COCOEvaluator (box and mask AP). Speed is the median
latency of each variant against fp32 on a fixed subset of the images, measured in ABBA order
(harness.compare), and peak tensor memory of one image.

By default it uses the demo's checkpoint and held-out split, so run `make demo` first:
  .venv/bin/python benchmarks/bench_fast_path.py
  .venv/bin/python benchmarks/bench_fast_path.py --variants bf16+cl
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
from fpn_plugin.utils.precision import auto_inference_path  # noqa: E402
from fpn_plugin.utils.cli import exit_on_errors, quiet_third_party_noise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
DEMO_WEIGHTS = os.path.join(ROOT, "output", "demo", "model_final.pth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=DEMO_CONFIG)
    p.add_argument("--weights", default=DEMO_WEIGHTS, help="trained checkpoint (.pth or .pkl)")
    p.add_argument("--dataset", default=None, help="registered dataset (default: DATASETS.TEST[0])")
    p.add_argument("--variants", nargs="+", default=["auto", "bf16+cl", "bf16", "fp32+cl"],
                   type=parse_variant, metavar="PRECISION[+cl]",
                   help="fast-path settings compared with fp32: auto, bf16, fp16 (CUDA) or fp32, "
                        "'+cl' for channels_last (default: auto bf16+cl bf16 fp32+cl)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timing-images", type=int, default=8,
                   help="images timed per repeat (the first ones of the dataset)")
    p.add_argument("--repeats", type=int, default=7)
    harness.add_output_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = p.parse_args(argv)
    # argparse applies `type` to given values, not to a list default.
    args.variants = [v if isinstance(v, tuple) else parse_variant(v) for v in args.variants]
    return args


def parse_variant(text):
    """'bf16+cl' -> ('bf16', True); 'fp32' alone is the reference, not a variant."""
    precision, _, layout = text.partition("+")
    if precision not in ("auto", "bf16", "fp16", "fp32") or layout not in ("", "cl") \
            or text == "fp32":
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected auto, bf16, fp16 or fp32, optionally with '+cl' (fp32 alone is "
            "the reference)")
    return precision, layout == "cl"


def _shown_path(path):
    """A path inside the checkout relative to it (the results file names no one's home)."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return path if relative.startswith("..") else relative


def variant_name(precision, channels_last, device_type="cpu"):
    """'bf16 + channels_last'; "auto" is named with what it picks here: 'auto (= bf16)'."""
    name = precision + (" + channels_last" if channels_last else "")
    if precision != "auto":
        return name
    picked, picked_cl = auto_inference_path(device_type)
    return f"{name} (= {variant_name(picked, channels_last or picked_cl)})"


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

    # One model object per variant, same weights, so no pass pays for switching layouts.
    model_fp32 = build_model(cfg).eval()
    SafeDetectionCheckpointer(model_fp32).load(args.weights)
    variants = []
    for precision, channels_last in args.variants:
        model = build_model(cfg).eval()
        model.load_state_dict(model_fp32.state_dict())
        enable_fast_inference(model, precision, channels_last=channels_last)
        variants.append((variant_name(precision, channels_last, torch.device(args.device).type),
                         model))

    with torch.no_grad():
        ap_fp32, loader = evaluate(model_fp32, cfg, dataset)
        ap = {name: evaluate(model, cfg, dataset)[0] for name, model in variants}

        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == args.timing_images:
                break

        def run(model):
            return lambda: [model(batch) for batch in batches]

        rows = []
        for name, model in variants:
            timing = harness.compare(run(model), run(model_fp32), warmup=1,
                                     repeats=args.repeats, device=args.device)
            memory = harness.compare_memory(lambda: model(batches[0]),
                                            lambda: model_fp32(batches[0]), device=args.device)
            rows += [{"name": f"{name}: {len(batches)} images, inference", "unit": "s",
                      "result": timing},
                     {"name": f"{name}: one image, peak tensor memory", "unit": "MiB",
                      "result": memory}]

    ap_table = "\n".join(
        [f"| {dataset} | fp32 | " + " | ".join(name for name, _ in variants) + " |",
         "|---|---|" + "---|" * len(variants)]
        + [f"| {label} | {ap_fp32[task]:.2f} | "
           + " | ".join(f"{ap[name][task]:.2f} ({ap[name][task] - ap_fp32[task]:+.2f})"
                        for name, _ in variants) + " |"
           for label, task in (("box AP", "bbox"), ("mask AP", "segm"))])
    command = "python benchmarks/bench_fast_path.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(harness.save("bench_fast_path", rows, command.strip(),
                       extra={"ap": {"fp32": ap_fp32, **ap}, "weights": _shown_path(args.weights),
                              "dataset": dataset, "variants": [n for n, _ in variants]},
                       labels=("variant", "fp32"), notes=ap_table,
                       write_results=args.write_results))


if __name__ == "__main__":
    main()
