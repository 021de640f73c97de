"""
projects/fpn_mask_rcnn: train_net.py survives SIGKILL (--resume continues from the last
checkpoint to SOLVER.MAX_ITER) and --eval-only evaluates; demo.py runs its whole pipeline.
Tiny model and images, so each run takes seconds of compute.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "train_net.py")
DEMO = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "demo.py")
DEMO_CONFIG = os.path.join(ROOT, "configs", "Demo", "mask_rcnn_R_18_custom_fpn_shapes.yaml")
# The demo model and dataset at 64 px with narrow heads.
TINY_OPTS = [
    "DATASETS.SHAPES.NUM_TRAIN", "8", "DATASETS.SHAPES.NUM_VAL", "2",
    "DATASETS.SHAPES.IMAGE_SIZE", "64",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]
MAX_ITER = 60
PERIOD = 5


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two cores shared with the rest of the suite
    return env


def _train_cmd(tmp_path, *extra):
    return [sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, *extra, *TINY_OPTS,
            "DATASETS.SHAPES.ROOT", str(tmp_path / "shapes"), "OUTPUT_DIR", str(tmp_path / "out"),
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD)]


def _last_checkpoint_iter(out):
    path = out / "last_checkpoint"
    if not path.is_file():
        return None
    name = path.read_text().strip()
    if not name.startswith("model_0"):
        return None
    return int(name[len("model_"):-len(".pth")])


def test_sigkill_then_resume_continues_to_max_iter(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_train_cmd(tmp_path), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # Kill once a second periodic checkpoint exists: training is under way, not finished.
        while time.time() < deadline and proc.poll() is None:
            it = _last_checkpoint_iter(out)
            if it is not None and it >= 2 * PERIOD - 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _last_checkpoint_iter(out)
    assert killed_at is not None and killed_at < MAX_ITER - 1
    assert not (out / "model_final.pth").exists()

    resumed = subprocess.run(_train_cmd(tmp_path, "--resume"), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {killed_at + 1}" in log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == MAX_ITER - 1
    # The resumed run wrote metrics from after the checkpoint up to the last iteration.
    iters = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()
             if line.strip().startswith("{") and "total_loss" in line]
    assert iters[-1] == MAX_ITER - 1
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    # TensorBoard events and the training curve are there too.
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    assert (out / "training_curve.png").is_file()

    # --eval-only on the final weights evaluates the held-out split and prints COCO AP.
    evaluated = subprocess.run(
        _train_cmd(tmp_path, "--eval-only") + ["MODEL.WEIGHTS", str(out / "model_final.pth")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "copypaste: Task: segm" in evaluated.stdout + evaluated.stderr


def test_amp_on_cpu_fails_at_start_with_the_key(tmp_path):
    result = subprocess.run(_train_cmd(tmp_path) + ["SOLVER.AMP.ENABLED", "True"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "SOLVER.AMP.ENABLED=True needs a CUDA device" in result.stderr


@pytest.mark.timeout(600)
def test_demo_pipeline_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, DEMO, "--output-dir", str(out), *TINY_OPTS,
         "DATASETS.SHAPES.ROOT", str(tmp_path / "shapes"), "DATASETS.SHAPES.NUM_VAL", "4",
         "SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "3"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fpn_plugin demo finished" in result.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    for key in ("model", "metrics_json", "training_curve", "export_results_json"):
        assert os.path.isfile(summary["files"][key]), key
    assert len(os.listdir(summary["files"]["overlays"])) == 4
    assert "segm" in summary["metrics"] and "bbox" in summary["metrics"]
    # Progress lines with an ETA from training, evaluation and export.
    log = (out / "log.txt").read_text()
    assert " eta: " in log and "Inference done" in log
    assert "ETA" in result.stdout + result.stderr
