#!/usr/bin/env python
"""
The CPU demo, end to end (what ``make demo`` runs):

1. generate the embedded shapes dataset if missing (``DATASETS.SHAPES.*``) and register it;
2. train Mask R-CNN built from fpn_plugin's components (configs/Demo/...) from scratch, and
   evaluate box and mask AP on the held-out split (every TEST.EVAL_PERIOD and at the end);
   the trainer draws the training curve (losses and AP over iterations) when it ends;
3. export the held-out predictions: COCO results JSON, instance maps and overlay pictures;
4. write the summary and print where everything is.

Every stage logs progress with an ETA. Re-running resumes from the last checkpoint (a finished
run is only re-evaluated and re-exported); ``--fresh`` starts over. A bad config value,
dataset, image or checkpoint ends the demo with exit status 2 and one ``error: ...`` line.

    .venv/bin/python projects/fpn_mask_rcnn/demo.py [--fresh] [--output-dir DIR] [KEY VALUE ...]
"""
import argparse
import logging
import os
import sys
import time

import fpn_plugin  # noqa: F401  (registers the plugin's components)
from fpn_plugin.checkpoint import CheckpointError
from fpn_plugin.config import load_config
from fpn_plugin.data.images import ImageFileError
from fpn_plugin.data.shapes import register_shapes_from_config
from fpn_plugin.engine import Trainer
from fpn_plugin.engine.precision import cpu_has_native_bf16
from fpn_plugin.engine.setup import default_setup
from fpn_plugin.io import OutputFolder
from fpn_plugin.utils.cli import exit_on_errors, quiet_third_party_noise
from fpn_plugin.utils.files import atomic_write_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
MASK_AP_TARGET = 70.0
STAGES = 4

logger = logging.getLogger("fpn_plugin.demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--output-dir", default=None,
                        help="where results go (default: the config's OUTPUT_DIR)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete a previous demo run in the output folder and train anew")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def build_cfg(args):
    cfg = load_config(args.config_file, args.opts, freeze=False)
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    _fp32_without_native_bf16(cfg, args.opts)
    cfg.freeze()
    return cfg


def _fp32_without_native_bf16(cfg, opts) -> None:
    """
    A demo config that trains in bf16 on CPU (the shipped one trains in fp32 + channels-last,
    see its comment) pays off only where the CPU computes bf16 natively (AVX512-BF16 or AMX);
    elsewhere oneDNN emulates it, slower than fp32, so the demo trains in fp32 there (with a
    warning) unless ``SOLVER.AMP.ENABLED`` was given on the command line. Explicit configs
    elsewhere get what they ask for (the trainer only warns).
    """
    if (not cfg.SOLVER.AMP.ENABLED or not str(cfg.MODEL.DEVICE).startswith("cpu")
            or "SOLVER.AMP.ENABLED" in opts[::2] or cpu_has_native_bf16()):
        return
    logger.warning("This CPU has no native bf16 (AVX512-BF16/AMX): the demo trains in fp32 "
                   "(SOLVER.AMP.ENABLED False); pass SOLVER.AMP.ENABLED True to force bf16")
    cfg.SOLVER.AMP.ENABLED = False


class Stages:
    """Logs "[k/N] stage" headers with elapsed time, and remembers each stage's duration."""

    def __init__(self):
        self.start = time.perf_counter()
        self.durations = {}
        self._current = None

    def begin(self, index, name):
        self.end()
        self._current = (name, time.perf_counter())
        logger.info(f"[{index}/{STAGES}] {name} (elapsed {self.elapsed():.0f} s)")

    def end(self):
        if self._current:
            name, t0 = self._current
            self.durations[name.split(":")[0]] = time.perf_counter() - t0
            self._current = None

    def elapsed(self):
        return time.perf_counter() - self.start


def _remove_previous_run(folder: OutputFolder) -> None:
    """--fresh: delete the files earlier demo runs created in the folder, and nothing else;
    a folder that holds anything else is refused (``OutputFolderError``, exit 2)."""
    folder.require_own("--fresh")
    removed = folder.clean()
    logger.info(f"--fresh: removed {len(removed)} file(s) of the previous run in {folder.path}")


def main(argv=None):
    quiet_third_party_noise()
    args = parse_args(argv)
    with exit_on_errors(ValueError, FileNotFoundError, CheckpointError, FloatingPointError,
                        ImageFileError):
        return run(args)


def run(args):
    cfg = build_cfg(args)
    folder = OutputFolder(cfg.OUTPUT_DIR)  # refuses an OUTPUT_DIR that is a file
    if args.fresh:
        _remove_previous_run(folder)
    before = folder.files()
    try:
        return _run(args, cfg)
    finally:
        # What the trainer, evaluator and export wrote becomes the demo's, so the next
        # --fresh removes exactly that (a SIGKILLed run's files stay foreign: --fresh refuses).
        folder.adopt_new(before)


def _run(args, cfg):
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False,
                                          opts=args.opts))
    stages = Stages()

    # 1. dataset -------------------------------------------------------------------------
    stages.begin(1, "dataset: generate (if missing) and register the shapes dataset")
    register_shapes_from_config(cfg)
    val_name = cfg.DATASETS.TEST[0]

    # 2. training + evaluation -----------------------------------------------------------
    stages.begin(2, f"train + evaluate: {cfg.SOLVER.MAX_ITER} iterations of "
                    f"{cfg.SOLVER.IMS_PER_BATCH} images on {cfg.MODEL.DEVICE}, box and mask AP on "
                    f"{val_name} every {cfg.TEST.EVAL_PERIOD} iterations and at the end "
                    "(ETA in the 'eta:' and 'Inference done' lines); the training curve is drawn "
                    "at the end")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter >= cfg.SOLVER.MAX_ITER:
        logger.info("Training already finished in this folder; evaluating and exporting again "
                    "(use --fresh to retrain)")
    # The trainer's EvalHook evaluates on DATASETS.TEST after the last iteration.
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    results = results.get(val_name, results)
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")

    # 3. export ----------------------------------------------------------------------------
    stages.begin(3, f"export: masks of {val_name} as COCO JSON + overlay pictures")
    from fpn_plugin.export import export_masks

    export_dir = os.path.join(cfg.OUTPUT_DIR, "export")
    export_summary = export_masks(cfg, weights, output_dir=export_dir, dataset=val_name,
                                  overlays=True, score_threshold=0.5, progress_period_s=5.0)

    # 4. summary ---------------------------------------------------------------------------
    stages.begin(4, "summary")
    curve = os.path.join(cfg.OUTPUT_DIR, "training_curve.png")  # drawn by the trainer's hook
    stages.end()
    box_ap = results.get("bbox", {}).get("AP", float("nan"))
    mask_ap = results.get("segm", {}).get("AP", float("nan"))
    summary = {
        "config": os.path.abspath(args.config_file),
        "output_dir": os.path.abspath(cfg.OUTPUT_DIR),
        "dataset": os.path.abspath(cfg.DATASETS.SHAPES.ROOT),
        "box_AP": box_ap,
        "mask_AP": mask_ap,
        "mask_AP_target": MASK_AP_TARGET,
        "metrics": results,
        "seconds": {k: round(v, 1) for k, v in stages.durations.items()},
        "total_seconds": round(stages.elapsed(), 1),
        "files": {
            "model": os.path.abspath(weights),
            "metrics_json": os.path.abspath(os.path.join(cfg.OUTPUT_DIR, "metrics.json")),
            "tensorboard_events": os.path.abspath(cfg.OUTPUT_DIR),
            "training_curve": os.path.abspath(curve),
            "eval_results_json": os.path.abspath(os.path.join(
                cfg.OUTPUT_DIR, "inference", val_name, "coco_instances_results.json")),
            "export_results_json": os.path.abspath(export_summary.get(
                "results_json", os.path.join(export_dir, "coco_instances_results.json"))),
            "overlays": os.path.abspath(os.path.join(export_dir, "overlays")),
            "log": os.path.abspath(os.path.join(cfg.OUTPUT_DIR, "log.txt")),
        },
    }
    atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "demo_summary.json"), summary, indent=1,
                      default=str)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in stages.durations.items())
    status = "reached" if mask_ap >= MASK_AP_TARGET else "MISSED"
    lines = [
        "",
        "=" * 78,
        f"fpn_plugin demo finished in {summary['total_seconds'] / 60:.1f} min "
        f"({timings})",
        f"held-out {val_name}: box AP {box_ap:.1f}, mask AP {mask_ap:.1f} "
        f"(target >= {MASK_AP_TARGET:.0f}: {status})",
        f"  model            {summary['files']['model']}",
        f"  metrics          {summary['files']['metrics_json']} (+ TensorBoard events there)",
        f"  training curve   {summary['files']['training_curve']}",
        f"  COCO results     {summary['files']['export_results_json']}",
        f"  overlays         {summary['files']['overlays']}/",
        f"  dataset          {summary['dataset']}",
        f"  summary          {os.path.abspath(os.path.join(cfg.OUTPUT_DIR, 'demo_summary.json'))}",
        "=" * 78,
    ]
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
