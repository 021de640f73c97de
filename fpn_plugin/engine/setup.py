"""Start-up of the training entries (train_net.py, the demo): Detectron2's, plus the plugin log."""
import logging

from detectron2.engine import default_setup as _detectron2_default_setup

from ..data.checks import check_before_setup

__all__ = ["default_setup", "log_like_detectron2"]


def log_like_detectron2() -> None:
    """
    Send the ``fpn_plugin`` loggers' records where Detectron2's go (the terminal and
    ``OUTPUT_DIR/log.txt`` after ``default_setup``), so that the plugin's warnings (skipped
    records, divergence, a damaged checkpoint) are in the log file too. The logger keeps
    propagating, so handlers of the root logger see its records as before.
    """
    source = logging.getLogger("detectron2")
    target = logging.getLogger("fpn_plugin")
    target.setLevel(logging.DEBUG)
    for handler in source.handlers:
        if handler not in target.handlers:
            target.addHandler(handler)


def default_setup(cfg, args) -> None:
    """Detectron2's ``default_setup`` (log.txt, config.yaml, seed, environment report) and
    :func:`log_like_detectron2`."""
    check_before_setup(cfg, args)  # before config.yaml is rewritten or OUTPUT_DIR made
    _detectron2_default_setup(cfg, args)
    log_like_detectron2()
