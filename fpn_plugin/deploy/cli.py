"""
Command line of the deployment::

    python -m fpn_plugin.deploy --config-file CONFIG.yaml --weights model_final.pth \\
        --format torchscript|onnx [--method trace|script] --output DIR \\
        [--images DIR | --dataset NAME] [options] [KEY VALUE ...]

Writes ``DIR/model.ts`` (TorchScript) or ``DIR/model.onnx`` and ``DIR/summary.json``, after
loading the written model back and comparing it with the eager model on the sample images
(see :mod:`fpn_plugin.deploy.deploy`). Trailing KEY VALUE pairs override config keys.

Exit status: 0 when the deployed model matches eager within the tolerances, 1 when it was
written but does not (summary.json says where), 2 on bad input or a model that cannot be
deployed this way (one ``error: ...`` line on stderr naming the option, key or file, and why),
130 when interrupted. Progress goes to stderr; stdout gets one JSON line (model file, verdict,
largest differences).
"""
import argparse
import json
import sys
import warnings
from typing import List, Optional

from ..utils.cli import (
    apply_device_option,
    inference_parser,
    log_to_stderr,
    quiet_third_party_noise,
    run_command,
)

__all__ = ["build_parser", "main"]

EXIT_CHECK_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    from .compare import Tolerances
    from .onnx_export import DEFAULT_OPSET

    tol = Tolerances()
    p = inference_parser(
        "python -m fpn_plugin.deploy",
        "Write a Mask R-CNN as TorchScript or ONNX and check the written model "
        "against the eager one on sample images.",
    )
    p.add_argument("--format", required=True, dest="fmt",
                   help="torchscript (model.ts) or onnx (model.onnx, run with ONNX Runtime)")
    p.add_argument("--method", default="trace",
                   help="trace (default; Detectron2's TracingAdapter, records the fast path) or "
                        "script (scripting_with_instances; TorchScript only)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", help="sample images: a folder (not recursive)")
    src.add_argument("--dataset", metavar="NAME",
                     help="sample images: a registered dataset (default DATASETS.TEST[0])")
    p.add_argument("--max-images", type=int, default=3, metavar="N",
                   help="sample images checked (default 3; a crop of the first is added)")
    p.add_argument("--device", default=None,
                   help="MODEL.DEVICE (default: the config's, or cpu when CUDA is absent); "
                        "ONNX is always traced and checked on the CPU")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (>= 16; default {DEFAULT_OPSET})")
    p.add_argument("--box-tolerance", type=float, default=tol.boxes, metavar="PX",
                   help=f"largest box coordinate difference allowed (default {tol.boxes} px)")
    p.add_argument("--score-tolerance", type=float, default=tol.scores,
                   help=f"largest score difference allowed (default {tol.scores})")
    p.add_argument("--mask-tolerance", type=float, default=tol.masks,
                   help=f"largest mask probability difference allowed (default {tol.masks})")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides as KEY VALUE pairs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the deploy command; returns the exit status."""
    quiet_third_party_noise()
    args = build_parser().parse_args(argv)
    from ..checkpoint import CheckpointError

    log_to_stderr()
    status, summary = run_command(lambda: _deploy(args),
                                  (ValueError, FileNotFoundError, CheckpointError),
                                  "the model file is written only when complete")
    if status:
        return status
    line = {"model_file": summary["model_file"], "passed": summary["passed"]}
    line.update(summary["largest"])
    print(json.dumps(line))
    if not summary["passed"]:
        print(f"error: the deployed model differs from eager beyond the tolerances "
              f"{summary['tolerances']}; see {args.output}/summary.json", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _deploy(args) -> dict:
    from ..config import load_config
    from .compare import Tolerances
    from .deploy import deploy_model

    with warnings.catch_warnings():
        # The tracer's and the ONNX exporter's notes on constants are about Detectron2's
        # code, checked by the comparison that follows.
        warnings.simplefilter("ignore")
        tolerances = Tolerances(args.box_tolerance, args.score_tolerance, args.mask_tolerance)
        cfg = load_config(args.config_file, args.opts, freeze=False)
        apply_device_option(cfg, args.device)
        return deploy_model(
            cfg, args.weights, output_dir=args.output, fmt=args.fmt, method=args.method,
            dataset=args.dataset, image_dir=args.images, max_images=args.max_images,
            opset=args.opset, tolerances=tolerances, config_file=args.config_file,
        )
