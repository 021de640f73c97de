"""
projects/fpn_mask_rcnn/lazy_train_net.py, the LazyConfig entry: the LazyConfig demo trains on
the shapes dataset (checkpoints, metrics, evaluation, training curve, a plain config.yaml),
continues with --resume (optimizer state included) and evaluates with --eval-only; two CPU
processes (gloo) train with --num-gpus 2; bad input ends with exit status 2 and one
``error: ...`` line before anything trains, and no weights file runs code. The demo at 64 px
with narrow heads (tests/demo_testutils.py): each run takes seconds.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from demo_testutils import LAZY_DEMO_CONFIG, LAZY_TINY_OPTS
from hostile_testutils import code_running_checkpoint, datasets_set_aside

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZY_TRAIN_NET = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "lazy_train_net.py")


def _load_script(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lazy_train_net():
    return _load_script(LAZY_TRAIN_NET, "lazy_train_net_under_test")


@pytest.fixture(scope="module")
def _shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lazy_shapes"))


@pytest.fixture
def shapes_root(_shapes_dir):
    """One tiny shapes dataset for the in-process runs (generated once per module). They
    register the real names: each test's registrations are dropped after it."""
    from fpn_plugin.data.shapes import SHAPES_DATASET_NAMES

    with datasets_set_aside(SHAPES_DATASET_NAMES):
        yield _shapes_dir


def _args(shapes_root, out, *flags_and_opts):
    from detectron2.engine import default_argument_parser

    flags = [a for a in flags_and_opts if a.startswith("--")]
    opts = [a for a in flags_and_opts if not a.startswith("--")]
    return default_argument_parser().parse_args(
        ["--config-file", LAZY_DEMO_CONFIG, *flags, *LAZY_TINY_OPTS,
         f"dataloader.shapes.root={shapes_root}", f"train.output_dir={out}", *opts])


def _metrics(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_lazy_demo_trains_resumes_and_evaluates(lazy_train_net, shapes_root, tmp_path,
                                                restore_loggers):
    out = tmp_path / "out"
    lazy_train_net.main(_args(shapes_root, out, "train.max_iter=4",
                              "train.checkpointer.period=2"))
    for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint",
                 "training_curve.png", "log.txt"):
        assert (out / name).is_file(), name
    records = _metrics(out)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1, 2, 3]
    assert any("bbox/AP" in r and "segm/AP" in r for r in records)  # the final evaluation
    assert all(r.get("data/invalid_records_skipped", 0) == 0 for r in records)
    # The saved config is plain YAML, with the plugin's settings at their defaults.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataloader"]["invalid_records"] == "skip"
    assert saved["train"]["divergence_factor"] == 100.0
    assert saved["model"]["backbone"]["_target_"] == "fpn_plugin.neck.CustomFPN"
    # The optimizer state is in the checkpoint (Detectron2 v0.6's loop leaves it out).
    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    optimizer_state = checkpoint.get("optimizer") or checkpoint["trainer"].get("optimizer")
    assert optimizer_state["state"], "no AdamW moments saved"
    assert checkpoint["trainer"]["iteration"] == 3

    lazy_train_net.main(_args(shapes_root, out, "--resume", "train.max_iter=6",
                              "train.checkpointer.period=2"))
    records = _metrics(out)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1, 2, 3, 4, 5]
    assert torch.load(out / "model_final.pth", weights_only=True)["trainer"]["iteration"] == 5

    results = lazy_train_net.main(_args(
        shapes_root, tmp_path / "eval", "--eval-only",
        f"train.init_checkpoint={out / 'model_final.pth'}"))
    assert set(results) == {"bbox", "segm"} and 0 <= results["segm"]["AP"] <= 100


def test_amp_on_cpu_trains_with_the_fast_training_path(lazy_train_net, shapes_root, tmp_path,
                                                      restore_loggers):
    """train.amp.enabled on CPU: the YAML entry's fast training path (bf16 convolutional
    components, channels-last with train.channels_last), fp32 weights in the checkpoint."""
    from fpn_plugin.engine.lazy import build_lazy_model, build_lazy_train_loop, load_lazy_config

    opts = ["train.amp.enabled=True", "train.channels_last=True"]
    cfg = load_lazy_config(LAZY_DEMO_CONFIG, [*LAZY_TINY_OPTS, *opts,
                                              f"dataloader.shapes.root={shapes_root}"])
    model = build_lazy_model(cfg)
    loop = build_lazy_train_loop(cfg, model, [], torch.optim.SGD(model.parameters(), lr=0.0))
    assert loop.model is model and model._fpn_plugin_fast_training == ("bf16", True)

    out = tmp_path / "out"
    lazy_train_net.main(_args(shapes_root, out, "train.max_iter=2", *opts))
    records = _metrics(out)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records if "total_loss" in r)
    weights = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def _expect_exit_2(run, capsys):
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("opts, expected", [
    (["train.max_iters=3"], "train has no entry 'max_iters'"),
    (["train.amp.enabled=True", "train.amp.precision=fp16"],
     "train.amp.precision 'fp16' needs a CUDA device"),
    (["dataloader.invalid_records=ignore"], "dataloader.invalid_records must be one of"),
    (["dataloader.shapes.num_train=0"], "dataloader.shapes.num_train must be an integer >= 1"),
    (["train.divergence_factor=0.5"], "train.divergence_factor must be 0 (off)"),
    (["model.backbone.fuse=weighted"], "model: cannot be built from the config"),
    (["model.backbone.fuse_type=product"], "MODEL.FPN.FUSE_TYPE"),
], ids=["unknown_entry", "fp16_on_cpu", "bad_policy", "no_shapes_images", "bad_divergence_factor",
        "unknown_argument", "bad_component_value"])
def test_bad_settings_end_with_one_error_line(lazy_train_net, shapes_root, tmp_path, capsys,
                                              restore_loggers, opts, expected):
    out = tmp_path / "out"
    last = _expect_exit_2(lambda: lazy_train_net.main(_args(shapes_root, out, *opts)), capsys)
    assert last.startswith("error: ") and expected in last, last
    assert not (out / "model_final.pth").exists()


def test_config_files_that_could_run_code_or_do_not_exist_are_refused(
        lazy_train_net, tmp_path, capsys, restore_loggers):
    from detectron2.engine import default_argument_parser

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "config.yaml"
    hostile.write_text("train: !!python/object/apply:os.system ['touch %s']\n" % marker)
    for path, expected in ((hostile, "is not plain YAML"),
                           (tmp_path / "missing.py", "config file not found")):
        args = default_argument_parser().parse_args(["--config-file", str(path)])
        last = _expect_exit_2(lambda: lazy_train_net.main(args), capsys)
        assert expected in last and str(path) in last
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
@pytest.mark.parametrize("flags", [["--eval-only"], []], ids=["eval_only", "train"])
def test_code_running_weights_are_refused(lazy_train_net, shapes_root, tmp_path, capsys,
                                          restore_loggers, suffix, flags):
    marker = tmp_path / "code_ran"
    weights = code_running_checkpoint(tmp_path / f"evil{suffix}", marker)
    args = _args(shapes_root, tmp_path / "out", *flags, f"train.init_checkpoint={weights}")
    last = _expect_exit_2(lambda: lazy_train_net.main(args), capsys)
    assert weights in last and "other than weights" in last
    assert not marker.exists()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_train_with_the_lazy_entry(tmp_path):
    """--num-gpus 2 without CUDA: two gloo processes, DDP over a CPU model, rank 0 writes."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two cores shared by the two processes
    cmd = [sys.executable, LAZY_TRAIN_NET, "--num-gpus", "2",
           "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
           "--config-file", LAZY_DEMO_CONFIG, *LAZY_TINY_OPTS,
           f"dataloader.shapes.root={tmp_path / 'shapes'}", f"train.output_dir={out}",
           "train.max_iter=2"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert [r["iteration"] for r in _metrics(out) if "total_loss" in r] == [0, 1]
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert state and not any(k.startswith("module.") for k in state)  # DDP unwrapped
    assert any("bbox/AP" in r for r in _metrics(out))  # the 2-process evaluation
