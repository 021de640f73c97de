"""The plugin imports, registers safely, and adds its config keys to a fresh config."""
import importlib
import os
import sys

import global_state_testutils
import pytest
from detectron2.config import get_cfg


def _purge_plugin_modules():
    for name in [m for m in sys.modules if m == "fpn_plugin" or m.startswith("fpn_plugin.")]:
        del sys.modules[name]


def test_add_config_adds_keys_without_touching_global_defaults():
    from fpn_plugin import add_fpn_plugin_config

    cfg = get_cfg()
    assert "TOP_BLOCK" not in cfg.MODEL.FPN
    add_fpn_plugin_config(cfg)
    assert cfg.MODEL.FPN.TOP_BLOCK == "maxpool"
    assert cfg.MODEL.FPN.UPSAMPLE_MODE == "nearest"
    # Detectron2's own defaults keep their values, and a new get_cfg() is untouched.
    assert cfg.MODEL.FPN.FUSE_TYPE == "sum"
    assert "TOP_BLOCK" not in get_cfg().MODEL.FPN
    # YAML-style overrides of plugin keys merge; a second call keeps what the user set.
    cfg.merge_from_list(["MODEL.FPN.UPSAMPLE_MODE", "bilinear",
                         "MODEL.FAST_INFERENCE.PRECISION", "bf16"])
    add_fpn_plugin_config(cfg)
    assert cfg.MODEL.FPN.UPSAMPLE_MODE == "bilinear"
    assert cfg.MODEL.FAST_INFERENCE.PRECISION == "bf16"


def test_add_config_refuses_frozen_config():
    from fpn_plugin import add_fpn_plugin_config

    cfg = get_cfg()
    cfg.freeze()
    with pytest.raises(ValueError, match="frozen"):
        add_fpn_plugin_config(cfg)


def test_second_import_does_not_fail():
    """Re-importing re-registers every component; afterwards the first import's modules and
    registry entries are put back, so tests that check class identity (``type(x) is
    PerLevelRPN``) see the same classes whatever ran before them."""
    import fpn_plugin
    from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY

    first = fpn_plugin
    first_rpn = PROPOSAL_GENERATOR_REGISTRY.get("PerLevelRPN")
    saved = global_state_testutils.capture()
    try:
        _purge_plugin_modules()
        second = importlib.import_module("fpn_plugin")
        assert second is not first
        importlib.reload(second)
        assert PROPOSAL_GENERATOR_REGISTRY.get("PerLevelRPN") is not first_rpn
    finally:
        global_state_testutils.restore(saved)
    assert sys.modules["fpn_plugin"] is first
    assert PROPOSAL_GENERATOR_REGISTRY.get("PerLevelRPN") is first_rpn
    assert not global_state_testutils.differences(saved, global_state_testutils.capture())


def test_register_replaces_same_name_and_refuses_foreign_objects():
    from detectron2.utils.registry import Registry

    from fpn_plugin.utils.registry import register

    reg = Registry("TEST_REG")

    def make():
        class Thing:
            pass

        return Thing

    a, b = make(), make()
    register(reg)(a)
    register(reg)(b)  # same qualified name: a re-import
    assert reg.get("Thing") is b

    class Thing:  # different qualified name, same registry name
        pass

    with pytest.raises(KeyError, match="already has 'Thing'"):
        register(reg)(Thing)


def _leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, type(node)):
            yield from _leaf_keys(value, prefix + key + ".")
        else:
            yield prefix + key


def test_config_keys_page_documents_every_plugin_config_key():
    """Each key add_fpn_plugin_config adds has a row in the key tables (docs/config_keys.md,
    moved there from the README)."""
    import os

    from fpn_plugin import add_fpn_plugin_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "config_keys.md")) as f:
        rows = [line for line in f if line.startswith("| `")]
    from fpn_plugin.config import add_shapes_config

    cfg = get_cfg()
    add_shapes_config(add_fpn_plugin_config(cfg))  # the shapes keys are documented there too
    detectron2_keys = set(_leaf_keys(get_cfg()))
    added = [k for k in _leaf_keys(cfg) if k not in detectron2_keys]
    assert len(added) >= 20
    undocumented = []
    for key in added:
        parent, leaf = key.rsplit(".", 1)
        # A row names the key in full, or as "`PARENT.A` / `LEAF`" next to a sibling.
        if not any(f"`{key}`" in row or (f"`{parent}." in row and f"`{leaf}`" in row)
                   for row in rows):
            undocumented.append(key)
    assert not undocumented, f"docs/config_keys.md has no table row for: {undocumented}"


# -- the shapes dataset's keys: only in the configs that use that dataset ---------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COCO_YAML = f"{_ROOT}/configs/COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml"
_DEMO_YAML = f"{_ROOT}/configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml"


def test_component_keys_leave_out_the_shapes_dataset():
    from fpn_plugin import add_fpn_plugin_config, load_config

    assert "SHAPES" not in add_fpn_plugin_config(get_cfg()).DATASETS
    cfg = load_config(_COCO_YAML)
    assert "SHAPES" not in cfg.DATASETS and "SHAPES" not in cfg.dump()
    assert cfg.MODEL.FPN.TOP_BLOCK == "maxpool"  # the component keys are there


@pytest.mark.parametrize("opts", [
    [],
    ["DATASETS.TEST", "('shapes_hard_val',)"],
    ["DATASETS.SHAPES.IMAGE_SIZE", "64"],
])
def test_configs_using_the_shapes_dataset_get_its_keys(opts, tmp_path):
    from fpn_plugin import load_config

    demo = load_config(_DEMO_YAML, opts)
    assert demo.DATASETS.SHAPES.NUM_TRAIN == 400  # the demo's value
    assert demo.DATASETS.SHAPES.HARD.MAX_INSTANCES == 12  # a default it does not set
    if opts:  # a config that does not name the dataset, told to by its overrides
        assert "SHAPES" in load_config(_COCO_YAML, opts).DATASETS
    # A YAML inheriting the demo's through _BASE_ uses the dataset too.
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{_DEMO_YAML}"\nSOLVER:\n  MAX_ITER: 2\n')
    assert load_config(str(child)).DATASETS.SHAPES.IMAGE_SIZE == 256


def test_add_shapes_config_keeps_values_already_set():
    from fpn_plugin import add_shapes_config

    cfg = add_shapes_config(get_cfg())
    cfg.DATASETS.SHAPES.NUM_VAL = 7
    del cfg.DATASETS.SHAPES.HARD["DISTRACTORS"]
    add_shapes_config(cfg)
    assert cfg.DATASETS.SHAPES.NUM_VAL == 7 and cfg.DATASETS.SHAPES.HARD.DISTRACTORS == 8
