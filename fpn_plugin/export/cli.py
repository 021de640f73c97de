"""
Command line of the mask export::

    python -m fpn_plugin.export --config-file CONFIG.yaml --weights model_final.pth \\
        (--dataset NAME | --images DIR) --output DIR [options] [KEY VALUE ...]

Trailing KEY VALUE pairs override config keys (Detectron2's ``opts``). Exit status: 0 on
success (skipped unreadable images are listed in the log and in summary.json), 2 on bad
input (one ``error: ...`` line on stderr naming the option, key, file or id; no traceback),
130 when interrupted. Numbers are checked by ``ExportOptions`` (e.g. --max-images >= 1,
--score-threshold in [0, 1]); the largest image decoded is INPUT.MAX_IMAGE_PIXELS. Progress
and logs go to stderr; stdout gets one JSON line (results path and counts), and a second with
metrics under --eval.
"""
import argparse
import contextlib
import json
import logging
import os
import sys
from typing import List, Optional

from ..utils.cli import (
    apply_device_option,
    inference_parser,
    log_to_stderr,
    quiet_third_party_noise,
    run_command,
)

__all__ = ["build_parser", "main", "setup_cfg"]

logger = logging.getLogger("fpn_plugin.export")


def build_parser() -> argparse.ArgumentParser:
    p = inference_parser(
        "python -m fpn_plugin.export",
        "Run a Detectron2 (fpn_plugin) model on a registered dataset or a folder "
        "of images; write COCO results JSON (RLE), instance-id PNGs and overlays.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="NAME",
                     help="a dataset registered in DatasetCatalog (Detectron2's builtin ones, "
                          "shapes_train/shapes_val from DATASETS.SHAPES, or --register-coco)")
    src.add_argument("--images", metavar="DIR", help="a folder of images (not recursive)")
    p.add_argument("--register-coco", nargs=2, metavar=("JSON", "IMAGE_ROOT"),
                   help="register --dataset NAME from a COCO JSON and its image folder first")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="min score (0-1) of instances in PNGs/overlays (JSON keeps all); "
                        "default 0.5")
    p.add_argument("--binary-masks", action="store_true", help="also one PNG per instance")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures")
    p.add_argument("--eval", action="store_true",
                   help="also evaluate with COCOEvaluator (box + segm; needs --dataset)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="export only the first N images")
    p.add_argument("--device", default=None,
                   help="MODEL.DEVICE (default: the config's, or cpu when CUDA is absent)")
    p.add_argument("--progress-period", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines (default 10)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides as KEY VALUE pairs")
    return p


def setup_cfg(config_file: str, opts: List[str], device: Optional[str] = None):
    """``fpn_plugin.config.load_config`` + the ``--device`` choice; frozen."""
    from ..config import load_config

    cfg = load_config(config_file, opts, freeze=False)
    apply_device_option(cfg, device)
    cfg.freeze()
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    """Run the export command; returns the exit status."""
    quiet_third_party_noise()
    args = build_parser().parse_args(argv)
    log_to_stderr()
    from ..checkpoint import CheckpointError

    status, summary = run_command(
        lambda: _export(args), (ValueError, FileNotFoundError, CheckpointError),
        "no results JSON written (a previous complete one is unchanged)")
    if status:
        return status
    print(json.dumps({k: summary[k] for k in ("results_json", "num_images", "num_exported",
                                              "num_detections")}))
    if summary.get("metrics"):
        print(json.dumps(summary["metrics"]))
    return 0


def _export(args) -> dict:
    from ..data.shapes import register_shapes_if_named
    from ..evaluation import build_coco_evaluator
    from ..utils.paths import check_output_dir
    from .export import export_masks

    if args.register_coco:
        if not args.dataset:
            raise ValueError("--register-coco needs --dataset NAME")
        from detectron2.data import DatasetCatalog
        from detectron2.data.datasets import register_coco_instances

        if args.dataset not in DatasetCatalog.list():
            register_coco_instances(args.dataset, {}, *args.register_coco)
    if args.eval and not args.dataset:
        raise ValueError("--eval needs --dataset (a folder of images has no annotations)")
    cfg = setup_cfg(args.config_file, args.opts, args.device)
    if args.dataset:
        register_shapes_if_named(cfg, [args.dataset])
    evaluator = None
    if args.eval:
        check_output_dir(args.output)  # before the evaluator writes into it
        evaluator = build_coco_evaluator(args.dataset, os.path.join(args.output, "coco_eval"),
                                         tasks=("bbox", "segm"), distributed=False)
    # stdout carries only the final JSON lines; pycocotools prints its tables to stdout.
    with contextlib.redirect_stdout(sys.stderr):
        return export_masks(
            cfg, args.weights, output_dir=args.output, dataset=args.dataset,
            image_dir=args.images, score_threshold=args.score_threshold,
            binary_masks=args.binary_masks, overlays=not args.no_overlays,
            evaluator=evaluator, max_images=args.max_images,
            progress_period_s=args.progress_period,
        )
