"""Makes the shared helpers in tests/ (model_testutils.py) importable in importlib mode, and
shares fixtures that several test folders need."""
import logging
import os
import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_addoption(parser):
    parser.addoption("--run-network", action="store_true", default=False,
                     help="also run the tests marked `network` (package registry, per-user "
                          "set-up cache); same as FPN_PLUGIN_RUN_NETWORK_TESTS=1")


def network_tests_enabled(config) -> bool:
    return (config.getoption("--run-network")
            or os.environ.get("FPN_PLUGIN_RUN_NETWORK_TESTS", "") not in ("", "0"))


def pytest_collection_modifyitems(config, items):
    """The default suite runs offline: `network` tests skip, saying how to enable them."""
    if network_tests_enabled(config):
        return
    skip = pytest.mark.skip(reason="needs the network or the per-user set-up cache: run with "
                                   "--run-network (CI does, in its own step: .ci/run)")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_loggers():
    """Undo what Detectron2's ``default_setup`` (run by in-process CLI tests) does to loggers:
    handlers writing to a test's folder, levels, propagation."""
    names = ("detectron2", "fpn_plugin", "fvcore")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level,
                 logging.getLogger(n).propagate) for n in names}
    yield
    for name, (handlers, level, propagate) in saved.items():
        log = logging.getLogger(name)
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


# Import-time registrations (Detectron2's built-in datasets, the plugin's components) happen
# once, before any test, so the guard below sees only what tests do.
import detectron2.data  # noqa: E402,F401
import fpn_plugin  # noqa: E402,F401
import global_state_testutils as _state  # noqa: E402


def _check_and_restore(before, what):
    changes = _state.differences(before, _state.capture())
    if changes:
        _state.restore(before)
        pytest.fail(f"{what} leaked process-wide state (restored now; later tests would have "
                    "seen it, so the suite's result would depend on test order):\n  "
                    + "\n  ".join(changes), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_no_global_state(request):
    """Module-scoped fixtures (trained models, registered datasets) clean up after themselves."""
    before = _state.capture()
    yield
    _check_and_restore(before, f"module {request.node.nodeid}")


@pytest.fixture(autouse=True)
def _test_leaves_no_global_state(request):
    """Every test leaves sys.modules, the registries, the catalogs, env vars, cwd, torch's
    global flags and the loggers as it found them (tests/global_state_testutils.py)."""
    before = _state.capture()
    yield
    _check_and_restore(before, f"test {request.node.nodeid}")
