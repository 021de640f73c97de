"""fpn_plugin.train, the package's training entry: what --config-file names, the launch flags
checked before any process starts, --help outside a checkout, and a whole LazyConfig and YAML
run through ``python -m fpn_plugin.train`` from another folder."""
import json
import os
import subprocess
import sys

import pytest
from demo_testutils import DEMO_CONFIG, LAZY_DEMO_CONFIG, LAZY_TINY_OPTS, TINY_OPTS, \
    TINY_SHAPES_OPTS

from fpn_plugin.engine.launch import check_launch_args
from fpn_plugin.train import resolve_config_file


def _entry(*args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fpn_plugin.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_config_file_kind_comes_from_its_name_and_entries(tmp_path):
    assert resolve_config_file(LAZY_DEMO_CONFIG) == (LAZY_DEMO_CONFIG, "lazy")
    assert resolve_config_file(DEMO_CONFIG) == (DEMO_CONFIG, "yaml")
    saved = tmp_path / "saved_lazy.yaml"
    saved.write_text("model: {_target_: x}\ntrain: {max_iter: 3}\n")
    assert resolve_config_file(str(saved)).kind == "lazy"
    plain = tmp_path / "plain.yaml"
    plain.write_text("_BASE_: base.yaml\nSOLVER: {MAX_ITER: 3}\n")
    assert resolve_config_file(str(plain)).kind == "yaml"
    tagged = tmp_path / "tagged.yaml"  # the LazyConfig loader refuses it with its message
    tagged.write_text("train: !!python/object/apply:os.system ['true']\n")
    assert resolve_config_file(str(tagged)).kind == "lazy"
    missing = str(tmp_path / "missing.yaml")  # the YAML loader names it
    assert resolve_config_file(missing) == (missing, "yaml")


@pytest.mark.parametrize("gpus,machines,rank,flag", [
    (1, 2, 5, "--machine-rank 5 is not below --num-machines 2"),
    (1, 2, 2, "--machine-rank 2 is not below --num-machines 2"),
    (0, 1, 0, "--num-gpus must be an integer >= 1"),
    (1, 0, 0, "--num-machines must be an integer >= 1"),
    (1, 1, -1, "--machine-rank must be an integer >= 0"),
])
def test_launch_flags_that_describe_no_job_are_refused(gpus, machines, rank, flag):
    with pytest.raises(ValueError, match=flag):
        check_launch_args(gpus, machines, rank)
    check_launch_args(2, 2, 1)  # the last machine of two


def test_a_machine_rank_beyond_the_machines_exits_2_at_once(tmp_path):
    run = _entry("--num-machines", "2", "--machine-rank", "5", "--config-file", DEMO_CONFIG,
                 cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --machine-rank 5 is not below --num-machines 2: machines are numbered 0 to 1")
    assert "Traceback" not in run.stderr


def test_help_works_outside_a_checkout(tmp_path):
    run = _entry("--help", cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "python -m fpn_plugin.train" in run.stdout
    assert "--num-machines" in run.stdout and "--eval-only" in run.stdout
    assert "LazyConfig" in run.stdout


def _metrics(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_one_entry_trains_a_lazy_config_and_a_yaml_config(tmp_path):
    lazy_out, yaml_out = tmp_path / "lazy", tmp_path / "yaml"
    run = _entry("--config-file", LAZY_DEMO_CONFIG, *LAZY_TINY_OPTS,
                 f"dataloader.shapes.root={tmp_path / 'shapes'}", f"train.output_dir={lazy_out}",
                 "train.max_iter=1", "train.eval_period=0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["iteration"] for r in _metrics(lazy_out) if "total_loss" in r] == [0]
    run = _entry("--config-file", DEMO_CONFIG, *TINY_SHAPES_OPTS, *TINY_OPTS,
                 "DATASETS.SHAPES.ROOT", str(tmp_path / "shapes_yaml"), "OUTPUT_DIR",
                 str(yaml_out), "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (yaml_out / "model_final.pth").is_file()
    assert [r["iteration"] for r in _metrics(yaml_out) if "total_loss" in r] == [0]
