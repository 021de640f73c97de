"""
What the command-line entries share: a quiet terminal and one way to end on a clear error.

- :func:`quiet_third_party_noise` keeps out of the terminal what torch and Detectron2 print on
  every CPU run that the user cannot act on (deprecation notices about Detectron2's own
  calls, "No CUDA runtime is found", the profiler's "gpuGetDeviceCount failed").
- :func:`log_to_stderr`: INFO lines of fpn_plugin and Detectron2 on stderr.
- :func:`exit_on_errors`: the listed exception types end the command with exit status 2 and
  one line ``error: <message>`` on stderr, without a traceback.
- :func:`run_command`: the body of a command that returns its exit status: the listed
  exception types give ``error: <message>`` and status 2, Ctrl-C a note and status 130.
- :func:`inference_parser`, :func:`apply_device_option`: the options every inference entry
  (export, deploy) has: ``--config-file``, ``--weights``, ``--device``.
"""
import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Tuple, Type

from .env import cuda_missing

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "apply_device_option", "exit_on_errors",
           "inference_parser", "log_to_stderr", "quiet_third_party_noise", "run_command"]

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# (category, message regex) of warnings raised inside torch/Detectron2 on every run.
_NOISE = (
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
    (FutureWarning, r".*torch\.cuda\.amp\..* is deprecated"),
    (UserWarning, r"torch\.meshgrid: in an upcoming release"),
    (UserWarning, r"pkg_resources is deprecated as an API"),  # Detectron2's model_zoo import
)


def quiet_third_party_noise() -> None:
    """Filter the known third-party start-up and run-time noise (see the module docstring)."""
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Detectron2's environment report looks for a CUDA toolkit and torch logs that it has none.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # The profiler (benchmarks' memory measurement) logs CUDA probing errors on CPU machines.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the one at set-up),
    so repeated in-process runs with redirected streams never write to a closed one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def log_to_stderr() -> None:
    """INFO lines of fpn_plugin and Detectron2 on stderr (Detectron2's setup_logger uses stdout)."""
    formatter = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    for name in ("fpn_plugin", "detectron2"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        if not any(isinstance(h, _CurrentStderrHandler) for h in log.handlers):
            handler = _CurrentStderrHandler()
            handler.setFormatter(formatter)
            log.addHandler(handler)


def _one_line(error: BaseException) -> str:
    message = str(error).strip() or type(error).__name__
    # An error re-raised from a DataLoader worker carries the worker's traceback as text.
    if "Original Traceback" in message:
        message = [line for line in message.splitlines() if line.strip()][-1].strip()
    return message


@contextlib.contextmanager
def exit_on_errors(*errors: Type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` raised in the block into ``error: ...`` on stderr and exit status 2."""
    caught: Tuple[Type[BaseException], ...] = tuple(errors)
    try:
        yield
    except caught as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


def inference_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the model options of an inference entry: ``--config-file``, ``--weights``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config-file", required=True, metavar="FILE", help="model config (YAML)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="checkpoint (.pth/.pkl); default: MODEL.WEIGHTS of the config")
    return p


def apply_device_option(cfg, device: Optional[str]) -> None:
    """
    ``--device`` of the inference entries, on an unfrozen config: ``MODEL.DEVICE = device``
    when given; else a CUDA ``MODEL.DEVICE`` on a machine without CUDA becomes "cpu", with a
    warning (a config written for GPUs still runs here).
    """
    if device:
        cfg.MODEL.DEVICE = device
    elif cuda_missing(cfg.MODEL.DEVICE):
        logger.warning("MODEL.DEVICE is %r and this machine has no CUDA: running on cpu",
                       cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def run_command(work: Callable[[], Any], errors: Tuple[Type[BaseException], ...],
                interrupted: str) -> Tuple[int, Any]:
    """
    Run ``work()``; return ``(0, its result)``, or ``(2, None)`` after printing
    ``error: <message>`` on stderr when it raised one of ``errors``, or ``(130, None)`` after
    printing ``interrupted: <interrupted>`` when the user pressed Ctrl-C.
    """
    try:
        return 0, work()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT, None
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED, None
