"""fpn_plugin.engine.Trainer: record validation reaches the metrics, AMP trains bf16 on CPU
with fp32 checkpoints that resume either way, bad AMP keys are refused up front, and the
training curve is drawn; plotting reads resumed metrics correctly."""
import json
import os

import pytest
import torch
from demo_testutils import DEMO_CONFIG, TINY_OPTS
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from hostile_testutils import code_running_checkpoint

from fpn_plugin import add_fpn_plugin_config, add_shapes_config
from fpn_plugin.data.shapes import register_shapes_dataset
from fpn_plugin.engine import Trainer, check_amp_config, plot_training_curve, read_metrics

# A Trainer sets up Detectron2's logger when it is not already at INFO (DefaultTrainer does the
# same), so whether a test adds handlers depends on what ran before it: undo it after each.
pytestmark = pytest.mark.usefixtures("restore_loggers")

def tiny_cfg(output_dir, train, test=(), max_iter=2):
    cfg = get_cfg()
    add_shapes_config(add_fpn_plugin_config(cfg))  # the demo config sets DATASETS.SHAPES
    cfg.merge_from_file(DEMO_CONFIG)
    cfg.merge_from_list(TINY_OPTS)
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Registered tiny shapes splits, and a training set with one missing image."""
    root = tmp_path_factory.mktemp("engine_shapes")
    prefix = f"engine_shapes_{os.getpid()}"
    train, val = register_shapes_dataset(str(root), prefix=prefix, num_train=4, num_val=2,
                                         image_size=64)
    broken = f"{prefix}_broken"

    def load_broken():
        records = [dict(r) for r in DatasetCatalog.get(train)]
        records[0]["file_name"] = str(root / "train" / "gone.jpg")
        return records

    DatasetCatalog.register(broken, load_broken)
    DatasetCatalog.get(train)
    MetadataCatalog.get(broken).thing_classes = MetadataCatalog.get(train).thing_classes
    yield {"train": train, "val": val, "broken": broken}
    for n in (train, val, broken):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_skipped_records_are_counted_in_metrics_and_listed(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["broken"]])
    trainer = Trainer(cfg)
    assert len(trainer.invalid_records) == 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = read_metrics(str(tmp_path / "metrics.json"))
    counts = [r["data/invalid_records_skipped"] for r in rows if "data/invalid_records_skipped" in r]
    assert counts == [1]
    with open(tmp_path / "invalid_records.json") as f:
        listed = json.load(f)
    assert [os.path.basename(p["file_name"]) for p in listed] == ["gone.jpg"]
    assert "missing" in listed[0]["reason"]
    assert os.path.isfile(tmp_path / "training_curve.png")
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_error_policy_refuses_before_training(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["broken"]])
    cfg.DATALOADER.INVALID_RECORDS = "error"
    with pytest.raises(ValueError, match="gone.jpg"):
        Trainer(cfg)
    cfg.DATALOADER.INVALID_RECORDS = "ignore"
    with pytest.raises(ValueError, match="DATALOADER.INVALID_RECORDS"):
        Trainer(cfg)


def test_bad_test_set_images_are_caught_before_training(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["train"]], test=[datasets["broken"]])
    cfg.DATALOADER.INVALID_RECORDS = "error"
    with pytest.raises(ValueError, match="gone.jpg"):
        Trainer(cfg)
    assert not os.path.exists(tmp_path / "last_checkpoint")


def test_amp_on_cpu_trains_bf16_channels_last_with_fp32_interchangeable_checkpoints(
        tmp_path, datasets):
    """SOLVER.AMP.ENABLED on CPU: bf16 ("auto") with the plugin's loop, not Detectron2's fp16
    AMPTrainer. Its checkpoints are fp32 and load strictly into a plain fp32 model; an fp32
    run resumes as bf16 + NHWC and a bf16 run resumes as fp32."""
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model

    def run(out, amp, max_iter, resume=False):
        cfg = tiny_cfg(out, [datasets["train"]], max_iter=max_iter)
        cfg.SOLVER.AMP.ENABLED = amp
        cfg.SOLVER.CHANNELS_LAST = amp
        cfg.SOLVER.CHECKPOINT_PERIOD = 2
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        start = trainer.start_iter
        trainer.train()
        return cfg, trainer, start

    out = tmp_path / "run"
    run(out, False, 2)  # fp32, checkpoint at iteration 2
    cfg, trainer, start = run(out, True, 4, resume=True)  # fp32 -> bf16 + NHWC
    assert start == 2 and trainer.precision == "bf16" and type(trainer._trainer) is SimpleTrainer
    assert trainer.model._fpn_plugin_fast_training == ("bf16", True)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in saved.values() if v.is_floating_point())
    plain = build_model(cfg)
    incompatible = plain.load_state_dict(saved, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in plain.state_dict().items())

    _, resumed, start = run(out, False, 5, resume=True)  # bf16 + NHWC -> fp32
    assert start == 4 and resumed.precision == "fp32"
    assert not hasattr(resumed.model, "_fpn_plugin_fast_training")
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("node,key,value,match", [
    ("SOLVER.AMP", "PRECISION", "fp16", "SOLVER.AMP.PRECISION 'fp16' needs a CUDA device"),
    ("SOLVER.AMP", "PRECISION", "fp8", "SOLVER.AMP.PRECISION must be one of .*'fp8'"),
    ("SOLVER", "CHANNELS_LAST", "yes", "SOLVER.CHANNELS_LAST must be True or False"),
    ("MODEL", "DEVICE", "cuda", "CUDA is not available"),
])
def test_amp_settings_that_cannot_work_are_refused_naming_the_key(tmp_path, node, key, value,
                                                                   match):
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = tiny_cfg(tmp_path, [])
    cfg.SOLVER.AMP.ENABLED = True
    target = cfg
    for part in node.split("."):
        target = target[part]
    target[key] = value
    with pytest.raises(ValueError, match=match):
        check_amp_config(cfg)
    # AMP off: fp16 (a real choice for CUDA) is simply unused; a misspelt value still fails.
    cfg.SOLVER.AMP.ENABLED = False
    if value in ("fp16", "cuda"):
        assert check_amp_config(cfg) == "fp32"
    else:
        with pytest.raises(ValueError, match=match):
            check_amp_config(cfg)


def test_read_metrics_keeps_the_resumed_history(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [
        {"iteration": 0, "data/invalid_records_skipped": 0},
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 39, "total_loss": 2.0},
        {"iteration": 59, "total_loss": 1.5},  # the killed run got here, after checkpoint 49
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"iteration": 6'  # cut mid-write
    resumed = [{"iteration": 50, "data/invalid_records_skipped": 0},
               {"iteration": 59, "total_loss": 1.4},
               {"iteration": 79, "total_loss": 1.0, "segm/AP": 50.0}]
    text += "\n" + "".join(json.dumps(x) + "\n" for x in resumed)
    path.write_text(text)
    rows = read_metrics(str(path))
    assert [r["iteration"] for r in rows] == [0, 19, 39, 50, 59, 79]
    assert rows[4]["total_loss"] == 1.4
    out = plot_training_curve(str(path), str(tmp_path / "curve.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_optimizer_choice(tmp_path):
    import torch
    from detectron2.modeling import build_model

    from fpn_plugin.engine.trainer import build_optimizer_for

    cfg = tiny_cfg(tmp_path, [])
    model = build_model(cfg)
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"  # the demo's choice
    opt = build_optimizer_for(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    # Detectron2's parameter groups: norm layers get SOLVER.WEIGHT_DECAY_NORM (0).
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, cfg.SOLVER.WEIGHT_DECAY}
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(build_optimizer_for(cfg, model), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER .*'LAMB'"):
        build_optimizer_for(cfg, model)


def test_checkpoint_holds_optimizer_state_and_resume_restores_it(tmp_path, datasets):
    import torch

    cfg = tiny_cfg(tmp_path, [datasets["train"]], max_iter=3)
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2
    moments = saved["trainer"]["_trainer"]["optimizer"]["state"]
    assert moments and all("exp_avg" in v for v in moments.values())  # AdamW moments kept

    cfg.SOLVER.MAX_ITER = 4
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    state = resumed.optimizer.state_dict()["state"]
    assert state.keys() == moments.keys()
    for key, entries in moments.items():  # every parameter's moments and step count
        assert state[key].keys() == entries.keys(), key
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(state[key][name]), torch.as_tensor(value)), \
                (key, name)


# -- weights, resume, divergence, leftovers: hostile and broken inputs ---------------------------

def test_trainer_reads_and_writes_checkpoints_with_the_safe_checkpointer(tmp_path, datasets):
    from detectron2.engine import hooks

    from fpn_plugin.checkpoint import SafeDetectionCheckpointer

    trainer = Trainer(tiny_cfg(tmp_path, [datasets["train"]]))
    assert isinstance(trainer.checkpointer, SafeDetectionCheckpointer)
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic and all(h.checkpointer is trainer.checkpointer for h in periodic)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_code_in_model_weights_never_runs(tmp_path, datasets, suffix):
    from fpn_plugin.checkpoint import CheckpointError

    marker = tmp_path / "code_ran"
    cfg = tiny_cfg(tmp_path / "out", [datasets["train"]])
    cfg.MODEL.WEIGHTS = code_running_checkpoint(tmp_path / f"evil{suffix}", marker)
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointError, match="other than weights") as info:
        trainer.resume_or_load(resume=False)
    assert cfg.MODEL.WEIGHTS in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "code"])
def test_resume_skips_a_damaged_last_checkpoint(tmp_path, datasets, caplog, damage):
    """A run killed while writing (truncated file) or a planted code-running file under the
    name last_checkpoint gives: a warning naming it, and the newest intact checkpoint."""
    cfg = tiny_cfg(tmp_path, [datasets["train"]], max_iter=2)
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    last = tmp_path / "model_final.pth"
    assert (tmp_path / "last_checkpoint").read_text() == last.name
    marker = tmp_path / "code_ran"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        code_running_checkpoint(last, marker)
    cfg.SOLVER.MAX_ITER = 3
    resumed = Trainer(cfg)
    with caplog.at_level("WARNING", logger="fpn_plugin"):
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2  # model_0000001.pth: the checkpoint after iteration 1
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(last) in warned and "model_0000001.pth" in warned
    assert not marker.exists()


def test_divergence_guard_names_the_iteration_and_the_learning_rate():
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from fpn_plugin.engine import TrainingDivergedError
    from fpn_plugin.engine.hooks import DivergenceGuard

    guard = DivergenceGuard(factor=100.0, base_lr=100.0)
    # Start ~4; one spike of 5000 at iteration 6 passes (the guard looks at 5-iteration
    # medians); the blow-up from iteration 9 on is caught once most of the window is above
    # 100 x 3.8 (the lowest of the first 5).
    losses = [4.0, 3.9, 4.2, 3.8, 4.1, 4.0, 5e3, 3.7, 50.0, 1e5, 1e9, 1e9]
    with EventStorage(0) as storage:
        guard.trainer = SimpleNamespace(storage=storage, iter=0)
        for it, loss in enumerate(losses):
            storage.iter = guard.trainer.iter = it
            storage.put_scalar("total_loss", loss)
            if it < 10:
                guard.after_step()  # steady, a single spike, or not yet mostly high
                continue
            with pytest.raises(TrainingDivergedError) as info:
                guard.after_step()
            break
    message = str(info.value)
    assert "iteration 10" in message and "SOLVER.BASE_LR (now 100)" in message
    assert "SOLVER.DIVERGENCE_FACTOR=100" in message

    # A learning rate far too high blows the loss up from the first step: the start's loss
    # (the lowest of the first 5) is the reference, so this is caught at the 5th iteration.
    guard = DivergenceGuard(factor=100.0, base_lr=100.0)
    with EventStorage(0) as storage:
        guard.trainer = SimpleNamespace(storage=storage, iter=0)
        with pytest.raises(TrainingDivergedError, match="iteration 4"):
            for it, loss in enumerate([5.0, 1e4, 1e6, 1e8, 1e9]):
                storage.iter = guard.trainer.iter = it
                storage.put_scalar("total_loss", loss)
                guard.after_step()


@pytest.mark.parametrize("key, value", [("SOLVER.DIVERGENCE_FACTOR", 0.5),
                                        ("SOLVER.DIVERGENCE_FACTOR", float("nan")),
                                        ("SOLVER.BASE_LR", float("inf")),
                                        ("SOLVER.BASE_LR", -0.1),
                                        ("INPUT.MAX_IMAGE_PIXELS", -1)],
                         ids=["divergence_factor_0.5", "divergence_factor_nan", "base_lr_inf",
                              "base_lr_negative", "pixel_limit_negative"])
def test_out_of_range_training_numbers_are_refused_with_the_key(tmp_path, key, value):
    cfg = tiny_cfg(tmp_path, [])
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Trainer(cfg)


def test_partial_files_of_a_killed_run_are_removed_at_start(tmp_path, datasets):
    (tmp_path / ".model_0000004.pth.0123456789ab.tmp").write_bytes(b"partial")
    (tmp_path / ".last_checkpoint.abcdef012345.tmp").write_bytes(b"mod")
    (tmp_path / ".notes.tmp").write_text("not ours")
    Trainer(tiny_cfg(tmp_path, [datasets["train"]]))
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".notes.tmp"]


def test_error_policy_lists_the_problems_of_training_and_test_sets(tmp_path, datasets):
    cfg = tiny_cfg(tmp_path, [datasets["broken"]], test=[datasets["broken"], datasets["val"]])
    cfg.DATALOADER.INVALID_RECORDS = "error"
    with pytest.raises(ValueError) as info:
        Trainer(cfg)
    message = str(info.value)
    # The missing image once as a training record, once as a test record; and the report file.
    assert message.startswith("2 problem(s)") and message.count("image file is missing") == 2
    listed = json.loads((tmp_path / "invalid_records.json").read_text())
    assert len(listed) == 2 and "invalid_records.json" in message


def test_datasets_are_validated_once_and_the_report_stays_on_the_trainer(tmp_path, datasets,
                                                                        monkeypatch):
    from fpn_plugin.data import build

    calls = []
    real = build.validate_records
    monkeypatch.setattr(build, "validate_records",
                        lambda records, name, *a, **k: calls.append(name) or real(records, name,
                                                                                 *a, **k))
    cfg = tiny_cfg(tmp_path, [datasets["broken"]], test=[datasets["val"]])
    cfg.TEST.PRECISE_BN.ENABLED = True  # PreciseBN builds one more train loader
    trainer = Trainer(cfg)
    assert sorted(calls) == sorted([datasets["broken"], datasets["val"]])
    assert trainer.dataset_check.num_skipped == 1
    assert not hasattr(trainer.data_loader, "fpn_plugin_invalid_records")


def test_skip_warnings_reach_the_log_file(tmp_path, datasets, restore_loggers):
    import argparse

    from fpn_plugin.engine.setup import default_setup

    cfg = tiny_cfg(tmp_path, [datasets["broken"]])
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file="", eval_only=False, opts=[]))
    Trainer(cfg)
    log = (tmp_path / "log.txt").read_text()
    assert "skipping 1 of" in log and "gone.jpg" in log


def test_building_and_training_leaves_detectron2_as_it_was(tmp_path, datasets):
    import detectron2.engine.defaults as d2_defaults
    from detectron2.engine import DefaultTrainer

    before = (dict(vars(d2_defaults)), dict(vars(DefaultTrainer)))
    cfg = tiny_cfg(tmp_path, [datasets["train"]], max_iter=1)
    cfg.SOLVER.AMP.ENABLED = True  # the plugin's loop, where DefaultTrainer makes AMPTrainer
    trainer = Trainer(cfg)
    assert (dict(vars(d2_defaults)), dict(vars(DefaultTrainer))) == before
    assert "build_model" not in vars(trainer) and "build_train_loader" not in vars(trainer)
    assert trainer.precision == "bf16" and trainer.checkpointer.model is trainer.model
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (dict(vars(d2_defaults)), dict(vars(DefaultTrainer))) == before
