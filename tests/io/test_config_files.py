"""
fpn_plugin.io.config_files: YAML configs read with yaml.safe_load only. A Python tag is
refused naming the file and line and never runs (through load_config, train_net.py and the
export CLI); _BASE_ follows local files and model-zoo names only; every config of the repo
loads exactly as Detectron2's merge_from_file loads it.
"""
import glob
import os
import subprocess
import sys

import pytest
from detectron2.config import get_cfg

from fpn_plugin.config import add_fpn_plugin_config, load_config
from fpn_plugin.data.config import add_shapes_config
from fpn_plugin.io import ConfigFileError, read_yaml_config
from fpn_plugin.io.config_files import MAX_BASE_DEPTH

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hostile_yaml(path, marker, base=None):
    lines = [f"_BASE_: {base}"] if base else []
    lines += ["MODEL:", f"  DEVICE: !!python/object/apply:os.system ['touch {marker}']"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_python_tag_in_a_config_never_runs_and_names_file_and_line(tmp_path):
    marker = tmp_path / "ran"
    path = _hostile_yaml(tmp_path / "evil.yaml", marker)
    with pytest.raises(ConfigFileError, match=r"evil\.yaml.* line 2 is not plain YAML"):
        load_config(path)
    assert not marker.exists()


def test_python_tag_in_a_base_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _hostile_yaml(tmp_path / "base.yaml", marker)
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 5\n")
    with pytest.raises(ConfigFileError, match=r"base\.yaml"):
        load_config(str(child))
    assert not marker.exists()


@pytest.mark.parametrize("base", ["http://example.invalid/base.yaml",
                                  "https://example.invalid/b.yaml", "s3://bucket/b.yaml"])
def test_base_that_is_an_address_is_refused_naming_the_file(tmp_path, base):
    path = tmp_path / "remote.yaml"
    path.write_text(f"_BASE_: \"{base}\"\n")
    with pytest.raises(ConfigFileError, match=r"remote\.yaml.*not a local file"):
        load_config(str(path))


def test_base_cycle_and_depth_are_bounded(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigFileError, match="cycle"):
        read_yaml_config(str(tmp_path / "a.yaml"))
    for i in range(MAX_BASE_DEPTH + 2):
        (tmp_path / f"c{i}.yaml").write_text(f"_BASE_: c{i + 1}.yaml\n")
    (tmp_path / f"c{MAX_BASE_DEPTH + 2}.yaml").write_text("SOLVER:\n  MAX_ITER: 1\n")
    with pytest.raises(ConfigFileError, match="deeper than"):
        read_yaml_config(str(tmp_path / "c0.yaml"))


def test_relative_base_values_merge_over_the_base(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 7\n  BASE_LR: 0.5\n")
    (tmp_path / "sub" / "child.yaml").write_text("_BASE_: ../base.yaml\nSOLVER:\n  MAX_ITER: 9\n")
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR) == (9, 0.5)


def test_model_zoo_base_resolves_to_the_installed_config(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text("_BASE_: model_zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml\n"
                    "SOLVER:\n  MAX_ITER: 11\n")
    cfg = load_config(str(path))
    assert cfg.MODEL.MASK_ON is True and cfg.SOLVER.MAX_ITER == 11
    path.write_text("_BASE_: model_zoo://No/such_config.yaml\n")
    with pytest.raises(ConfigFileError, match="model-zoo"):
        load_config(str(path))


def test_unknown_key_and_not_a_mapping_name_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("SOLVER:\n  MAX_ITERS: 5\n")
    with pytest.raises(ValueError, match=r"typo\.yaml.*MAX_ITERS"):
        load_config(str(path))
    path.write_text("- a list\n")
    with pytest.raises(ConfigFileError, match="not a mapping"):
        load_config(str(path))


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_every_repo_config_loads_as_detectron2_merge_from_file(config):
    expected = get_cfg()
    add_fpn_plugin_config(expected)
    if "shapes" in os.path.basename(config):  # the demo's dataset keys, only where used
        add_shapes_config(expected)
    expected.merge_from_file(config)
    assert load_config(config, freeze=False) == expected


def _run(cmd, tmp_path):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("entry", ["train_net", "export"])
def test_code_in_a_yaml_config_never_runs_from_the_entries(tmp_path, entry):
    marker = tmp_path / "ran"
    path = _hostile_yaml(tmp_path / "evil.yaml", marker)
    if entry == "train_net":
        cmd = [sys.executable, os.path.join(ROOT, "projects", "fpn_mask_rcnn", "train_net.py"),
               "--config-file", path]
    else:
        cmd = [sys.executable, "-m", "fpn_plugin.export", "--config-file", path,
               "--weights", str(tmp_path / "w.pth"), "--images", str(tmp_path),
               "--output", str(tmp_path / "out")]
    result = _run(cmd, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "evil.yaml" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_base_address_from_train_net_is_exit_2_naming_the_file(tmp_path):
    path = tmp_path / "remote.yaml"
    path.write_text("_BASE_: \"http://127.0.0.1:9/base.yaml\"\n")
    result = _run([sys.executable, os.path.join(ROOT, "projects", "fpn_mask_rcnn", "train_net.py"),
                   "--config-file", str(path)], tmp_path)
    assert result.returncode == 2
    assert "remote.yaml" in result.stderr and "Traceback" not in result.stderr
