#!/usr/bin/env python
"""
Memory and time of the mask export (``fpn_plugin.export.export_masks``).

Two measurements, one results file (``bench_export.{json,md}``):

  memory   resident memory (RSS) of the process after each exported image of one streaming
           export: the demo model shrunk to 64 px (random weights, score threshold 0, 20
           detections per image, every one written and drawn, overlays on) over --memory-images
           shapes images of 64 px. Results stream to disk, so RSS must stay flat.
  profile  where an image's time goes (cProfile, CPU time of the process, one torch thread):
           the demo config at 256 px with random weights, 20 detections per image, all drawn,
           binary masks on, over --profile-images images: inference, the export-side writing
           (id PNG, per-image JSON, binary PNGs, overlay), the overlay drawing, and image
           encoding with atomic writes (after one untimed image).

CPU time rather than wall time: it does not count the time other processes hold the cores.

    .venv/bin/python benchmarks/bench_export.py [--write-results]
"""
import argparse
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

import fpn_plugin  # noqa: E402,F401  (registers the plugin's components)
from fpn_plugin.config import load_config  # noqa: E402
from fpn_plugin.data.shapes import ensure_shapes_dataset  # noqa: E402
from fpn_plugin.export import export as export_module  # noqa: E402
from fpn_plugin.export import export_masks, writers  # noqa: E402
from fpn_plugin.utils.cli import quiet_third_party_noise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
DATA_ROOT = os.path.join(ROOT, "datasets", "generated", "shapes_bench_export")
# Random weights detect nothing above the default threshold: keep 20 detections per image.
DETECTIONS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
              "MODEL.DEVICE", "cpu"]
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.FPN.OUT_CHANNELS", "32",
         "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
         "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]
MIB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory-images", type=int, default=300)
    p.add_argument("--profile-images", type=int, default=6)
    harness.add_output_arguments(p)
    return p.parse_args(argv)


def _random_weights(cfg, path):
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


def measure_memory(num_images, workdir):
    """RSS (bytes) after each exported image."""
    cfg = load_config(DEMO_CONFIG, SMALL + DETECTIONS)
    weights = _random_weights(cfg, os.path.join(workdir, "small.pth"))
    _, image_dir = ensure_shapes_dataset(os.path.join(DATA_ROOT, "64px"), num_train=1,
                                         num_val=num_images, image_size=64)["val"]
    process = psutil.Process()
    rss = []
    original = export_module.ImageOutputWriter.write

    def write_and_sample(self, result):
        original(self, result)
        rss.append(process.memory_info().rss)

    export_module.ImageOutputWriter.write = write_and_sample
    try:
        summary = export_masks(cfg, weights, image_dir=image_dir,
                               output_dir=os.path.join(workdir, "memory"), score_threshold=0.0,
                               progress_period_s=30.0)
    finally:
        export_module.ImageOutputWriter.write = original
    return rss, summary["num_detections"]


def _cumulative(stats, module_file, function):
    """Cumulative seconds of ``function`` defined in ``module_file`` (all its calls)."""
    total = 0.0
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if name == function and os.path.samefile(filename, module_file):
            total += cumulative
    return total


def measure_profile(num_images, workdir):
    """CPU seconds per image of each stage, one torch thread."""
    cfg = load_config(DEMO_CONFIG, DETECTIONS)
    weights = _random_weights(cfg, os.path.join(workdir, "demo.pth"))
    _, image_dir = ensure_shapes_dataset(os.path.join(DATA_ROOT, "256px"), num_train=1,
                                         num_val=num_images, image_size=256)["val"]
    # One untimed image first: imports and one-off set-up (fonts, kernels) are not per-image.
    export_masks(cfg, weights, image_dir=image_dir, output_dir=os.path.join(workdir, "warmup"),
                 score_threshold=0.0, binary_masks=True, max_images=1, progress_period_s=30.0)
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    summary = export_masks(cfg, weights, image_dir=image_dir,
                           output_dir=os.path.join(workdir, "profile"), score_threshold=0.0,
                           binary_masks=True, progress_period_s=30.0)
    profiler.disable()
    stats = pstats.Stats(profiler)
    n = summary["num_exported"]
    stages = {
        "inference (resize + model forward)": _cumulative(stats, export_module.__file__,
                                                          "__call__"),
        "export-side writing (id PNG, per-image JSON, binary PNGs, overlay)":
            _cumulative(stats, export_module.__file__, "write"),
        "of which the overlay drawing (Detectron2's Visualizer) and its JPEG":
            _cumulative(stats, export_module.__file__, "_write_overlay"),
        "of which image encoding and atomic writes (every PNG and JPEG)":
            _cumulative(stats, writers.__file__, "write_image"),
    }
    return {name: seconds / n for name, seconds in stages.items()}, n, summary["num_detections"]


def render(payload):
    """The markdown of a bench_export payload."""
    env = payload["environment"]
    memory, profile = payload["memory"], payload["profile"]
    marks = [i for i in (10, 50, 100, 200) if i < memory["images"]] + [memory["images"]]
    lines = [
        f"Command: `{payload['command']}`  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Date: {payload['date']}",
        "",
        f"Resident memory during one streaming export ({memory['images']} images of 64 px, "
        f"{memory['detections']} detections, all written and drawn):",
        "",
        "| images exported | " + " | ".join(str(i) for i in marks) + " |",
        "|---|" + "---|" * len(marks),
        "| RSS (MiB) | " + " | ".join(f"{memory['rss_bytes'][i - 1] / MIB:.1f}" for i in marks)
        + " |",
        "",
        f"CPU time per image ({profile['images']} images of 256 px, demo model with random "
        f"weights, {profile['detections']} detections, all drawn, binary masks on; cProfile, "
        "one torch thread):",
        "",
        "| stage | CPU seconds per image |",
        "|---|---|",
    ] + [f"| {name} | {seconds:.3f} |" for name, seconds in profile["seconds_per_image"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    quiet_third_party_noise()
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        rss, detections = measure_memory(args.memory_images, workdir)
        print(f"memory: RSS {rss[0] / MIB:.1f} MiB after 1 image, {rss[-1] / MIB:.1f} MiB after "
              f"{len(rss)}", flush=True)
        per_image, n, profile_detections = measure_profile(args.profile_images, workdir)
    command = "python benchmarks/bench_export.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {
        "command": command.strip(),
        "environment": harness.environment(),
        "date": time.strftime("%Y-%m-%d"),
        "memory": {"images": len(rss), "detections": detections, "rss_bytes": rss},
        "profile": {"images": n, "detections": profile_detections,
                    "seconds_per_image": per_image},
    }
    print(harness.write_payload("bench_export", payload, render(payload), args.write_results))


if __name__ == "__main__":
    main()
