"""fpn_plugin.model_zoo in a checkout: every config by name, close names for unknown ones, the
config kinds, Detectron2's own configs read as its model zoo reads them. (From an installed
wheel: tests/test_wheel.py.)"""
import os

import pytest
from detectron2.config import CfgNode
from omegaconf import DictConfig, OmegaConf

import fpn_plugin  # noqa: F401  (registers the components)
from fpn_plugin import model_zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def test_a_checkout_reads_its_configs_folder():
    assert os.path.realpath(model_zoo.config_root()) == os.path.realpath(CONFIGS)
    on_disk = sorted(os.path.relpath(os.path.join(d, f), CONFIGS).replace(os.sep, "/")
                     for d, _, files in os.walk(CONFIGS) for f in files
                     if f.endswith((".yaml", ".py")))
    assert model_zoo.list_configs() == on_disk
    for name in on_disk:
        assert model_zoo.get_config_file(name) == os.path.join(CONFIGS, *name.split("/"))


@pytest.mark.parametrize("name, suggested", [
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1X.yaml",
     "COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml"),
    ("mask_rcnn_R_18_custom_fpn_shapes.yaml", "Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml"),
    ("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
     "new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py"),
])
def test_unknown_name_lists_close_names(name, suggested):
    with pytest.raises(FileNotFoundError, match="did you mean") as e:
        model_zoo.get_config_file(name)
    assert suggested in str(e.value) and repr(name) in str(e.value)


@pytest.mark.parametrize("name", ["", "/etc/passwd.yaml", "../setup.py", "Demo/../../setup.py",
                                  "Demo/README", None])
def test_what_is_not_a_config_name_is_refused(name):
    with pytest.raises(ValueError, match="config name"):
        model_zoo.get_config_file(name)


def test_yaml_config_has_the_plugin_keys_and_stays_editable():
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_panet_1x.yaml")
    assert isinstance(cfg, CfgNode) and not cfg.is_frozen()
    assert cfg.MODEL.FPN.TOP_BLOCK == "maxpool"  # a plugin key, at its default
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_custom_fpn_backbone"
    cfg.SOLVER.MAX_ITER = 10


def test_lazy_config_loads_with_its_relative_imports():
    cfg = model_zoo.get_config("Demo/mask_rcnn_R_18_custom_fpn_shapes.py")
    assert isinstance(cfg, DictConfig)
    assert cfg.model.backbone.bottom_up.stages.depth == 18  # from ../common/models/...
    assert cfg.dataloader.train.dataset.names == "shapes_train"


def test_get_builds_a_fresh_model_and_says_there_are_no_weights():
    with pytest.warns(UserWarning, match="no trained weights"):
        model = model_zoo.get("Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml", device="cpu")
    assert not model.training
    assert type(model.backbone).__module__.startswith("fpn_plugin.")
    assert next(model.parameters()).device.type == "cpu"


def test_detectron2_configs_read_as_its_model_zoo_reads_them():
    # Main's model_zoo imports pkg_resources, which setuptools >= 81 no longer ships (the
    # reason the plugin finds these files itself; the project's v0.6 wheel does without it):
    # compare wherever it imports.
    try:
        from detectron2 import model_zoo as detectron2_zoo
    except ModuleNotFoundError as e:
        if e.name != "pkg_resources":
            raise
        pytest.skip("this Detectron2's model_zoo needs pkg_resources, which is not installed")

    for name in ("common/models/mask_rcnn_fpn.py", "common/train.py",
                 "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"):
        assert os.path.samefile(model_zoo.get_detectron2_config_file(name),
                                detectron2_zoo.get_config_file(name))
        ours = OmegaConf.to_yaml(model_zoo.get_detectron2_config(name), resolve=False)
        assert ours == OmegaConf.to_yaml(detectron2_zoo.get_config(name), resolve=False)


def test_detectron2_config_names_are_checked():
    with pytest.raises(FileNotFoundError, match="mask_rcnn_fpn.py"):
        model_zoo.get_detectron2_config_file("common/models/mask_rcnn_fpm.py")
    with pytest.raises(ValueError, match="LazyConfig"):
        model_zoo.get_detectron2_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")


def _train_module():
    import fpn_plugin.train as train

    return train


def test_training_entry_takes_model_zoo_names(tmp_path, monkeypatch):
    train = _train_module()
    lazy = "Demo/mask_rcnn_R_18_custom_fpn_shapes.py"
    yaml_name = "COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml"
    monkeypatch.chdir(tmp_path)
    assert train.resolve_config_file(lazy) == (model_zoo.get_config_file(lazy), "lazy")
    assert train.resolve_config_file(yaml_name) == (model_zoo.get_config_file(yaml_name), "yaml")
    # A file of that name here comes first; a missing absolute path is left to the loader.
    (tmp_path / "COCO-InstanceSegmentation").mkdir()
    (tmp_path / yaml_name).write_text("SOLVER:\n  MAX_ITER: 2\n")
    assert train.resolve_config_file(yaml_name) == (yaml_name, "yaml")
    missing = str(tmp_path / "missing.yaml")
    assert train.resolve_config_file(missing) == (missing, "yaml")
    with pytest.raises(FileNotFoundError, match="did you mean: Demo/mask_rcnn_R_18_custom_fpn"):
        train.resolve_config_file("Demo/mask_rcnn_R_18_custom_fpn_shape.yaml")


def test_training_entry_refuses_an_unknown_name_in_one_line(capsys):
    train = _train_module()
    with pytest.raises(SystemExit) as e:
        train.cli(["--config-file", "Demo/mask_rcnn_R_18_custom_fpn_shape.yaml"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().startswith("error: config file not found") and \
        "Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml" in err
