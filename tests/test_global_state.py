"""The guard tests/conftest.py runs around every test sees each kind of process-wide change a
test could leak (so a leaky test fails where it is, not a later test in a shuffled order), and
its restore puts everything back."""
import logging
import os
import sys

import global_state_testutils as state
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY


def _leak_plugin_reimport():
    for name in [m for m in sys.modules if m == "fpn_plugin" or m.startswith("fpn_plugin.")]:
        del sys.modules[name]
    import fpn_plugin  # noqa: F401  (re-registers new classes)


def _leak_dataset():
    DatasetCatalog.register("guard_probe_dataset", lambda: [])
    MetadataCatalog.get("guard_probe_dataset").thing_classes = ["a"]


def _leak_env():
    os.environ["FPN_PLUGIN_GUARD_PROBE"] = "1"


def _leak_cwd():
    os.chdir(os.path.dirname(os.getcwd()) or "/")


def _leak_torch():
    torch.set_num_threads(max(1, torch.get_num_threads() + 1))
    torch.set_default_dtype(torch.float64)


def _leak_logger():
    logging.getLogger("fpn_plugin").addHandler(logging.NullHandler())
    logging.getLogger("detectron2").setLevel(logging.CRITICAL)


def _leak_registry_entry():
    class GuardProbe:
        pass

    PROPOSAL_GENERATOR_REGISTRY._do_register("GuardProbe", GuardProbe)


@pytest.mark.parametrize("leak, expected", [
    (_leak_plugin_reimport, "sys.modules: 'fpn_plugin'"),
    (_leak_dataset, "DatasetCatalog: 'guard_probe_dataset' left registered"),
    (_leak_env, "os.environ: 'FPN_PLUGIN_GUARD_PROBE' added"),
    (_leak_cwd, "working directory changed"),
    (_leak_torch, "torch: 'default_dtype' changed"),
    (_leak_logger, "logger 'fpn_plugin': handlers"),
    (_leak_registry_entry, "registry PROPOSAL_GENERATOR: 'GuardProbe' added"),
], ids=lambda v: getattr(v, "__name__", None))
def test_guard_sees_the_leak_and_restore_undoes_it(leak, expected):
    before = state.capture()
    rpn_class = PROPOSAL_GENERATOR_REGISTRY.get("PerLevelRPN")
    try:
        leak()
        changes = state.differences(before, state.capture())
    finally:
        state.restore(before)
    assert any(line.startswith(expected) for line in changes), changes
    assert state.differences(before, state.capture()) == []
    assert PROPOSAL_GENERATOR_REGISTRY.get("PerLevelRPN") is rpn_class


def test_lazily_imported_modules_registering_components_are_not_a_leak():
    before = state.capture()
    fake = type(sys)("fpn_plugin_guard_probe_module")

    class Lazy:
        pass

    Lazy.__module__ = fake.__name__
    sys.modules[fake.__name__] = fake
    try:
        PROPOSAL_GENERATOR_REGISTRY._do_register("GuardLazyProbe", Lazy)
        assert state.differences(before, state.capture()) == []
    finally:
        PROPOSAL_GENERATOR_REGISTRY._obj_map.pop("GuardLazyProbe")
        del sys.modules[fake.__name__]
