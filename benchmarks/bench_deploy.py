#!/usr/bin/env python
"""
Inference latency of the deployed Mask R-CNN against the eager model, on one image, in one run.

Each row times a deployed form (A) against the eager model it was made from (B), alternated in
ABBA order with medians and spread (harness.compare), after warm-up calls (TorchScript
optimises on its first calls):

  TorchScript trace  vs eager                 fp32
  TorchScript script vs eager                 fp32
  ONNX Runtime (CPU) vs eager                 fp32 (skipped without onnxruntime)
  eager fast path    vs eager                 MODEL.FAST_INFERENCE bf16 + channels-last vs fp32
  TorchScript trace  vs eager, fast path      both bf16 + channels-last
  TorchScript trace of the fast path vs eager fp32
  Detectron2's own Mask R-CNN (built-in FPN, RPN, mask head): TorchScript trace vs eager, fp32
      - the reference for what tracing gives a Detectron2 model on this machine

Every deployed model is compared with its eager model on the timed image first
(fpn_plugin.deploy.compare_detections; the result is printed and saved with the timings), so
the rows are known to time the same work.

Default model: configs/COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml at
800x1088 (the COCO test resolution) with random weights (seeded). As in bench_models.py, a
random model is given a trained model's workload: the RPN and box delta predictors are zeroed
(proposals = anchors) and the test score threshold is 0, so every image yields 1000 proposals
and 100 detections with masks. With --weights (a trained model) nothing is changed.

  .venv/bin/python benchmarks/bench_deploy.py
  .venv/bin/python benchmarks/bench_deploy.py --size 256 256 \
      --config-file configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml
"""
import argparse
import copy
import json
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

import fpn_plugin  # noqa: E402,F401  (registers the plugin's components)
from fpn_plugin.checkpoint import CheckpointError, SafeDetectionCheckpointer  # noqa: E402
from fpn_plugin.config import load_config  # noqa: E402
from fpn_plugin.deploy import (  # noqa: E402
    OnnxRuntimeModel,
    Tolerances,
    compare_detections,
    eager_outputs,
    export_onnx,
    outputs_to_instances,
    script_model,
    trace_model,
)
from fpn_plugin.deploy.onnx_export import onnx_unavailable_reason  # noqa: E402
from fpn_plugin.inference import enable_fast_inference  # noqa: E402
from fpn_plugin.utils.cli import exit_on_errors, quiet_third_party_noise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation",
                              "mask_rcnn_R_50_custom_fpn_1x.yaml")
# Detectron2's names for the components the plugin's configs replace (its own model, same
# config otherwise).
BUILTINS = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.PROPOSAL_GENERATOR.NAME",
            "RPN", "MODEL.RPN.HEAD_NAME", "StandardRPNHead", "MODEL.ROI_MASK_HEAD.NAME",
            "MaskRCNNConvUpsampleHead"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--weights", default=None,
                   help="checkpoint (default: random weights, seeded; latency barely depends "
                        "on the values, but the number of detections does)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1088], metavar=("H", "W"),
                   help="model input size (default 800 1088)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch and ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--precision", default="bf16", choices=["bf16"],
                   help="fast-path precision (CPU: bf16)")
    p.add_argument("--no-detectron2-reference", dest="reference", action="store_false",
                   help="skip the row of Detectron2's own model")
    harness.add_output_arguments(p)
    p.add_argument("--rerender", action="store_true",
                   help="only rewrite the tracked results' notes and verdict table from "
                        "benchmarks/results/bench_deploy.json (no model is run)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return p.parse_args(argv)


def build(args, opts=()):
    cfg = load_config(args.config_file, list(args.opts) + list(opts), freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.FAST_INFERENCE.PRECISION = "fp32"  # the fast path is switched on explicitly
    cfg.MODEL.FAST_INFERENCE.CHANNELS_LAST = False
    if not args.weights:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights:
        SafeDetectionCheckpointer(model, strict=not opts).load(args.weights, checkpointables=[])
    else:
        deltas = [m for n, m in model.proposal_generator.named_modules()
                  if n.endswith("anchor_deltas")] + [model.roi_heads.box_predictor.bbox_pred]
        for layer in deltas:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return model


CHECKS = {}


def checked(name, eager_model, deployed, image):
    """``deployed`` as a zero-argument timing callable, after comparing it with eager."""
    want = eager_outputs(eager_model, image)
    with torch.no_grad():
        got = outputs_to_instances(deployed(image))
    diff = compare_detections(want, got, *image.shape[1:])
    CHECKS[name] = dict(diff.to_dict(), within_tolerances=diff.within(Tolerances()))
    print(f"[bench] {name}: {diff.eager_detections} eager / {diff.deployed_detections} deployed "
          f"detections, {diff.paired} paired, largest box diff {diff.max_box_diff:.3g} px, "
          f"score {diff.max_score_diff:.3g}", flush=True)

    def run():
        with torch.no_grad():
            return deployed(image)
    return run


def eager(model, image):
    def run():
        return eager_outputs(model, image)
    return run


# Why a form fails the deploy tolerances, by how it was made (shown next to its FAIL).
FAILURE_CAUSES = {
    "trace": ("traced: above 4000 box coordinates torchvision's batched_nms loops per class in "
              "eager but a trace records its offset-coordinates variant, which keeps other "
              "boxes where this random model's scores tie (docs/deploy.md, Limits; Detectron2's "
              "own trace fails the same way; `--method script` avoids it)"),
    "onnx": ("exported from a trace, so the same NMS difference as the traced forms "
             "(docs/deploy.md, Limits)"),
}


def _cause(name: str) -> str:
    kind = "onnx" if "onnx" in name.lower() else "trace" if "trace" in name.lower() else None
    return FAILURE_CAUSES.get(kind, "cause not established: see the check's numbers")


def verdicts(checks) -> str:
    """The deployed-vs-eager check of every form as a table: PASS/FAIL against the deploy
    tolerances (fpn_plugin.deploy.Tolerances), the numbers behind it, and for a FAIL its cause."""
    lines = ["Deployed vs eager detections on the timed image (the deploy command's check):", "",
             "| form | verdict | paired / eager | unpaired | largest box diff (px) | "
             "largest score diff | why |", "|---|---|---|---|---|---|---|"]
    for name, c in checks.items():
        ok = c["within_tolerances"]
        verdict = "PASS, bit-identical" if c["bitwise_equal"] else "PASS" if ok else "**FAIL**"
        lines.append(f"| {name} | {verdict} | {c['paired']}/{c['eager_detections']} | "
                     f"{c['unpaired']} | {c['max_box_diff']:.2g} | {c['max_score_diff']:.2g} | "
                     f"{'' if ok else _cause(name)} |")
    failed = [n for n, c in checks.items() if not c["within_tolerances"]]
    lines += ["", (f"{len(failed)} of {len(checks)} forms fail: their timings are of models that "
                   f"do not give eager's detections on this input." if failed else
                   "Every form passes.")]
    return "\n".join(lines)


def rerender(path: str) -> str:
    """Rewrite a results payload's notes (verdict table included) from its own checks, without
    re-running it; returns the new notes."""
    with open(path) as f:
        payload = json.load(f)
    head = payload["notes"].split("\n\nDeployed vs eager", 1)[0]
    payload["notes"] = f"{head}\n\n{verdicts(payload['checks'])}"
    harness.write_payload("bench_deploy", payload, harness.render(payload), write_results=True,
                          measured_now=False)
    return payload["notes"]


def main(argv=None):
    quiet_third_party_noise()
    args = parse_args(argv)
    if args.rerender:
        print(rerender(os.path.join(harness.RESULTS_DIR, "bench_deploy.json")))
        return
    with exit_on_errors(ValueError, FileNotFoundError, CheckpointError):
        run(args, argv)


def run(args, argv=None):
    warnings.simplefilter("ignore")  # the tracer's and exporter's notes on constants
    torch.set_num_threads(args.threads)
    model = build(args)
    image = torch.rand(3, *args.size, generator=torch.Generator().manual_seed(0)) * 255
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    rows = []

    def row(name, fn_a, fn_b):
        print(f"[bench] timing {name} ...", flush=True)
        rows.append({"name": name, "unit": "s", "result": harness.compare(fn_a, fn_b, **timing)})

    eager_fp32 = eager(model, image)
    traced = trace_model(model, image)
    row("TorchScript trace vs eager, fp32", checked("trace", model, traced, image), eager_fp32)
    scripted = script_model(model)
    row("TorchScript script vs eager, fp32", checked("script", model, scripted, image),
        eager_fp32)
    onnx_note = onnx_unavailable_reason()
    if onnx_note is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            export_onnx(traced, image, path)
            session = OnnxRuntimeModel(path, num_threads=args.threads)
        row("ONNX Runtime (CPU) vs eager, fp32", checked("onnx", model, session, image),
            eager_fp32)

    fast = enable_fast_inference(copy.deepcopy(model), args.precision, channels_last=True)
    fast_name = f"{args.precision} + channels-last"
    eager_fast = eager(fast, image)
    row(f"eager fast path ({fast_name}) vs eager fp32", eager_fast, eager_fp32)
    traced_fast = trace_model(fast, image)
    run_traced_fast = checked("trace, fast path", fast, traced_fast, image)
    row(f"TorchScript trace vs eager, both {fast_name}", run_traced_fast, eager_fast)
    row("TorchScript trace of the fast path vs eager fp32", run_traced_fast, eager_fp32)

    if args.reference:
        builtin = build(args, BUILTINS)
        row("Detectron2's own Mask R-CNN: TorchScript trace vs eager, fp32",
            checked("Detectron2 trace", builtin, trace_model(builtin, image), image),
            eager(builtin, image))

    workload = ("weights " + args.weights if args.weights else
                "random weights (seed 0) with a trained model's workload (see the script)")
    notes = (f"Model {os.path.relpath(args.config_file, ROOT)}, input {args.size[0]}x"
             f"{args.size[1]}, one image per call, {args.threads} threads; {workload}. "
             f"A = the first form named, B = the second. ONNX Runtime: "
             f"{onnx_note or 'CPUExecutionProvider'}.\n\n{verdicts(CHECKS)}")
    command = "python benchmarks/bench_deploy.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(harness.save("bench_deploy", rows, command.strip(),
                       extra={"config_file": os.path.relpath(args.config_file, ROOT),
                              "weights": args.weights, "size": args.size, "checks": CHECKS},
                       labels=("A", "B"), notes=notes, write_results=args.write_results))


if __name__ == "__main__":
    main()
