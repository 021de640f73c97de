"""Makes tests/deploy/deploy_testutils.py importable (pytest runs in importlib mode); one torch
thread for the tiny models of these tests."""
import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from threads, and the shared 2-core machines make them contend.
    # Module scope: set before the module-scoped models compute their eager references, since
    # a convolution's float rounding depends on the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cli_logging_undone(restore_loggers):
    """The CLIs run in-process here configure fpn_plugin's and Detectron2's loggers
    (``log_to_stderr``); later tests get them back as they were."""
    yield
