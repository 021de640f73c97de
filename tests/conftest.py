"""Makes the shared helpers in tests/ (model_testutils.py) importable in importlib mode, and
shares fixtures that several test folders need."""
import logging
import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


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
