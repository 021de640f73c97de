"""
fpn_plugin.io.lazy_yaml: a LazyConfig saved as YAML is data. Every _target_ must be under the
allowed module prefixes (detectron2, fpn_plugin, torch, torchvision, fvcore, plus what the
user adds with --allow-target-prefix); refused naming the file and the key path, and the
callable never runs. Keys Detectron2 itself reads (train.seed) are accepted as overrides.
"""
import os
import subprocess
import sys

import pytest
from demo_testutils import LAZY_DEMO_CONFIG
from detectron2.config import LazyConfig

from fpn_plugin.engine.lazy import load_lazy_config
from fpn_plugin.io import LazyTargetError, check_lazy_yaml
from fpn_plugin.io.lazy_yaml import DEFAULT_TARGET_PREFIXES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZY_TRAIN_NET = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "lazy_train_net.py")


def _yaml_calling(path, target, marker):
    path.write_text("model:\n  backbone:\n"
                    f"    _target_: {target}\n    args: [[touch, '{marker}']]\n")
    return str(path)


def test_subprocess_target_is_refused_naming_file_and_key_path(tmp_path):
    marker = tmp_path / "ran"
    path = _yaml_calling(tmp_path / "evil.yaml", "subprocess.call", marker)
    with pytest.raises(LazyTargetError, match=r"evil\.yaml.*model\.backbone\._target_.*"
                                              r"subprocess\.call"):
        load_lazy_config(path)
    assert not marker.exists()


def test_targets_that_fetch_code_are_refused_under_allowed_prefixes(tmp_path):
    path = _yaml_calling(tmp_path / "hub.yaml", "torch.hub.load", tmp_path / "m")
    with pytest.raises(LazyTargetError, match="fetch or unpickle"):
        check_lazy_yaml(path)


def test_a_prefix_the_user_adds_is_allowed_and_checked(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  _target_: mypackage.models.Net\n  layers: [1, {_target_: torch.nn.ReLU}]\n")
    with pytest.raises(LazyTargetError, match=r"model\._target_"):
        check_lazy_yaml(str(path))
    assert check_lazy_yaml(str(path), ["mypackage"])["model"]["layers"][0] == 1
    with pytest.raises(ValueError, match="dotted module name"):
        check_lazy_yaml(str(path), ["my package; rm"])
    path.write_text("model:\n  layers: [{_target_: os.system}]\n")
    with pytest.raises(LazyTargetError, match=r"model\.layers\[0\]\._target_"):
        check_lazy_yaml(str(path), ["mypackage"])


def test_a_saved_plugin_config_passes_and_loads(tmp_path):
    cfg = load_lazy_config(LAZY_DEMO_CONFIG)
    saved = tmp_path / "saved.yaml"
    LazyConfig.save(cfg, str(saved))
    targets = check_lazy_yaml(str(saved))
    assert targets["model"]["_target_"].split(".")[0] in DEFAULT_TARGET_PREFIXES
    assert load_lazy_config(str(saved)).model.backbone._target_ == "fpn_plugin.neck.CustomFPN"


def test_train_seed_is_a_known_key(tmp_path):
    cfg = load_lazy_config(LAZY_DEMO_CONFIG)
    del cfg.train["seed"]
    LazyConfig.save(cfg, str(tmp_path / "no_seed.yaml"))
    assert load_lazy_config(str(tmp_path / "no_seed.yaml"), ["train.seed=7"]).train.seed == 7
    assert load_lazy_config(str(tmp_path / "no_seed.yaml")).train.seed == -1  # Detectron2's


def test_lazy_train_net_refuses_a_callable_target_and_it_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = _yaml_calling(tmp_path / "evil.yaml", "subprocess.call", marker)
    result = subprocess.run([sys.executable, LAZY_TRAIN_NET, "--config-file", path], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.backbone._target_" in last and "evil.yaml" in last
    assert "Traceback" not in result.stderr and not marker.exists()
