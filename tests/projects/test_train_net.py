"""
projects/fpn_mask_rcnn: train_net.py survives SIGKILL (--resume continues from the last
checkpoint to SOLVER.MAX_ITER) and --eval-only evaluates; demo.py runs its whole pipeline;
bad input and a diverging run end with exit status 2 and a one-line error; no entry point
(training, --eval-only, --resume, the demo, the fast-path benchmark) runs code from a weights
file. Tiny model and images, so each run takes seconds of compute; subprocesses only where
the exit status or the terminal output is the point.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from demo_testutils import DEMO_CONFIG, TINY_SHAPES_OPTS
from demo_testutils import TINY_OPTS as DEMO_TINY_OPTS
from hostile_testutils import code_running_checkpoint, datasets_set_aside

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "train_net.py")
DEMO = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "demo.py")
# The demo model and dataset at 64 px with narrow heads.
TINY_OPTS = TINY_SHAPES_OPTS + DEMO_TINY_OPTS
MAX_ITER = 60
PERIOD = 5


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two cores shared with the rest of the suite
    return env


def _train_cmd(tmp_path, *extra, max_iter=MAX_ITER):
    return [sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, *extra, *TINY_OPTS,
            "DATASETS.SHAPES.ROOT", str(tmp_path / "shapes"), "OUTPUT_DIR", str(tmp_path / "out"),
            "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD)]


def _last_checkpoint_iter(out):
    path = out / "last_checkpoint"
    if not path.is_file():
        return None
    name = path.read_text().strip()
    if not name.startswith("model_0"):
        return None
    return int(name[len("model_"):-len(".pth")])


@pytest.mark.timeout(900)
def test_ctrl_c_during_training_exits_130_with_one_line(tmp_path):
    """Ctrl-C (SIGINT) while training: exit status 130, one `interrupted:` line, no traceback;
    the checkpoints written so far stay (issue 24)."""
    out = tmp_path / "out"
    # A suite started in the background by a shell without job control (`make test &`)
    # inherits SIGINT as ignored, and so would the training process: give it the default
    # disposition, as a terminal's Ctrl-C finds it.
    proc = subprocess.Popen(_train_cmd(tmp_path, max_iter=100000), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while proc.poll() is None and _last_checkpoint_iter(out) is None:
            time.sleep(0.2)
        assert proc.poll() is None, "training stopped before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted: training stopped" in stderr
    assert _last_checkpoint_iter(out) is not None


def test_sigkill_then_resume_continues_to_max_iter(tmp_path):
    out = tmp_path / "out"
    # A run that cannot end by itself before the kill (MAX_ITER far away).
    proc = subprocess.Popen(_train_cmd(tmp_path, max_iter=100000), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill once a second periodic checkpoint exists: an event, not a time limit (on a
        # loaded machine it comes late; pytest's timeout bounds the whole test).
        while proc.poll() is None:
            it = _last_checkpoint_iter(out)
            if it is not None and it >= 2 * PERIOD - 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training stopped before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _last_checkpoint_iter(out)
    assert killed_at is not None and killed_at >= 2 * PERIOD - 1
    assert not (out / "model_final.pth").exists()

    # Resume and finish two more checkpoint periods. (The subprocess timeouts below only
    # stop a hung run; nothing is asserted on time.)
    max_iter = killed_at + 1 + 2 * PERIOD
    resumed = subprocess.run(_train_cmd(tmp_path, "--resume", max_iter=max_iter), cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Third-party start-up noise stays out of the terminal (Detectron2 logs to stdout).
    for noise in ("FutureWarning", "UserWarning", "No CUDA runtime", "gpuGetDeviceCount"):
        assert noise not in resumed.stderr, resumed.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {killed_at + 1}" in log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == max_iter - 1
    # The resumed run wrote metrics from after the checkpoint up to the last iteration.
    iters = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()
             if line.strip().startswith("{") and "total_loss" in line]
    assert iters[-1] == max_iter - 1
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    # TensorBoard events and the training curve are there too.
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    assert (out / "training_curve.png").is_file()

    # --eval-only on the final weights evaluates the held-out split and prints COCO AP.
    evaluated = subprocess.run(
        _train_cmd(tmp_path, "--eval-only") + ["MODEL.WEIGHTS", str(out / "model_final.pth")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "copypaste: Task: segm" in evaluated.stdout + evaluated.stderr


def test_fp16_amp_on_cpu_fails_at_start_with_the_key(tmp_path):
    result = subprocess.run(_train_cmd(tmp_path) + ["SOLVER.AMP.ENABLED", "True",
                                                    "SOLVER.AMP.PRECISION", "fp16"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error: SOLVER.AMP.PRECISION 'fp16' needs a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


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


def test_diverging_run_stops_with_a_clear_error(tmp_path):
    """AdamW at SOLVER.BASE_LR 100 blows the loss up: the run stops with exit status 2 and a
    message naming the iteration and SOLVER.BASE_LR, no traceback."""
    cmd = _train_cmd(tmp_path) + ["SOLVER.BASE_LR", "100.0", "SOLVER.WARMUP_ITERS", "0",
                                  "SOLVER.CHECKPOINT_PERIOD", "1000"]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: training diverged" in result.stderr
    assert "SOLVER.BASE_LR (now 100)" in result.stderr
    assert "iteration" in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out" / "model_final.pth").exists()


# -- in-process: every path that loads weights refuses code-running files ----------------------

def _load_script(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def _shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("inprocess_shapes"))


@pytest.fixture
def shapes_root(_shapes_dir):
    """One tiny shapes dataset for the in-process runs (generated once per module). They
    register the real names: each test's registrations are dropped after it."""
    from fpn_plugin.data.shapes import SHAPES_DATASET_NAMES

    with datasets_set_aside(SHAPES_DATASET_NAMES):
        yield _shapes_dir


def _expect_exit_2(run, capsys):
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    return capsys.readouterr().err


def _train_net_args(shapes_root, out, *flags, weights=None):
    from detectron2.engine import default_argument_parser

    opts = [*TINY_OPTS, "DATASETS.SHAPES.ROOT", shapes_root, "OUTPUT_DIR", str(out),
            "SOLVER.MAX_ITER", "2"] + (["MODEL.WEIGHTS", weights] if weights else [])
    return default_argument_parser().parse_args(
        ["--config-file", DEMO_CONFIG, *flags, *opts])


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
@pytest.mark.parametrize("flags", [["--eval-only"], []], ids=["eval_only", "train"])
def test_train_net_refuses_code_running_weights(tmp_path, shapes_root, capsys, restore_loggers,
                                                suffix, flags):
    train_net = _load_script(TRAIN_NET, "train_net_under_test")
    marker = tmp_path / "code_ran"
    weights = code_running_checkpoint(tmp_path / f"evil{suffix}", marker)
    args = _train_net_args(shapes_root, tmp_path / "out", *flags, weights=weights)
    err = _expect_exit_2(lambda: train_net.main(args), capsys)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and weights in last and "other than weights" in last
    assert not marker.exists()


def test_train_net_resume_refuses_a_planted_checkpoint(tmp_path, shapes_root, capsys,
                                                      restore_loggers):
    train_net = _load_script(TRAIN_NET, "train_net_under_test")
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "code_ran"
    code_running_checkpoint(out / "model_0000009.pth", marker)
    (out / "last_checkpoint").write_text("model_0000009.pth")
    err = _expect_exit_2(lambda: train_net.main(_train_net_args(shapes_root, out, "--resume")),
                         capsys)
    assert "cannot resume: no intact checkpoint" in err and "model_0000009.pth" in err
    assert not marker.exists()


def test_demo_refuses_code_running_weights(tmp_path, shapes_root, capsys, restore_loggers):
    demo = _load_script(DEMO, "demo_under_test")
    marker = tmp_path / "code_ran"
    weights = code_running_checkpoint(tmp_path / "evil.pkl", marker)
    argv = ["--output-dir", str(tmp_path / "demo"), *TINY_OPTS, "DATASETS.SHAPES.ROOT",
            shapes_root, "MODEL.WEIGHTS", weights]
    err = _expect_exit_2(lambda: demo.main(argv), capsys)
    assert weights in err and "Traceback" not in err
    assert not marker.exists()


def test_benchmark_refuses_code_running_weights(tmp_path, shapes_root, capsys, restore_loggers):
    bench = _load_script(os.path.join(ROOT, "benchmarks", "bench_fast_path.py"), "bench_under_test")
    marker = tmp_path / "code_ran"
    weights = code_running_checkpoint(tmp_path / "evil.pth", marker)
    argv = ["--weights", weights, *TINY_OPTS, "DATASETS.SHAPES.ROOT", shapes_root]
    err = _expect_exit_2(lambda: bench.main(argv), capsys)
    assert weights in err
    assert not marker.exists()


def test_demo_trains_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    """bf16 would be emulated (slower than fp32) on such a CPU: the demo falls back to fp32
    there, unless SOLVER.AMP.ENABLED was given on the command line."""
    from fpn_plugin.config import load_config

    demo = _load_script(DEMO, "demo_under_test")

    def amp_after_check(opts, native):
        monkeypatch.setattr(demo, "cpu_has_native_bf16", lambda: native)
        cfg = load_config(DEMO_CONFIG, ["SOLVER.AMP.ENABLED", "True"], freeze=False)
        demo._fp32_without_native_bf16(cfg, opts)
        return cfg.SOLVER.AMP.ENABLED

    assert not amp_after_check(["SOLVER.MAX_ITER", "10"], native=False)
    assert amp_after_check(["SOLVER.AMP.ENABLED", "True"], native=False)
    assert amp_after_check([], native=True)
