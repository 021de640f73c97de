"""
The plugin's training hooks, shared by the YAML trainer (:class:`~fpn_plugin.engine.Trainer`)
and the LazyConfig trainer (:class:`~fpn_plugin.engine.lazy.LazyTrainer`):

- :class:`InvalidRecordsMetric`: the number of dataset records left out, in the metrics.
- :class:`DivergenceGuard`: stops a run whose loss explodes, naming the learning rate's key.
- :class:`TrainingCurve`: ``training_curve.png`` once the metrics writers have flushed.
- :func:`divergence_reported`: around a training loop, a diverging run ends with one
  :class:`TrainingDivergedError` message and no traceback in the log.
"""
import contextlib
import logging
import os
import statistics
from typing import Iterator, Optional, Tuple

from detectron2.engine import HookBase

from .plotting import plot_training_curve

__all__ = ["INVALID_RECORDS_METRIC", "DivergenceGuard", "InvalidRecordsMetric",
           "TrainingCurve", "TrainingDivergedError", "divergence_reported"]

logger = logging.getLogger(__name__)

INVALID_RECORDS_METRIC = "data/invalid_records_skipped"


class TrainingDivergedError(FloatingPointError):
    """The training loss exploded (``SOLVER.DIVERGENCE_FACTOR`` / ``train.divergence_factor``)."""


class InvalidRecordsMetric(HookBase):
    """Puts the number of skipped dataset records into the metrics when training starts."""

    def __init__(self, num_skipped: int):
        self._num_skipped = num_skipped

    def before_train(self):
        self.trainer.storage.put_scalar(INVALID_RECORDS_METRIC, self._num_skipped,
                                        smoothing_hint=False)


class DivergenceGuard(HookBase):
    """
    Stops training when the total loss explodes: the median of the last ``window`` losses
    above ``factor`` times the start's loss (the lowest of the first ``window``: a learning
    rate far too high blows the loss up within the first few steps). Raises
    :class:`TrainingDivergedError` naming the iteration and the learning rate's key.

    Args:
        factor: the allowed growth (> 1).
        base_lr: the learning rate, for the message.
        keys: the names of the factor's and the learning rate's settings in the user's config
            (YAML by default; ``("train.divergence_factor", "optimizer.lr")`` for a LazyConfig).
    """

    def __init__(self, factor: float, base_lr: float, window: int = 5,
                 keys: Tuple[str, str] = ("SOLVER.DIVERGENCE_FACTOR", "SOLVER.BASE_LR")):
        self._factor = factor
        self._base_lr = base_lr
        self._window = window
        self._factor_key, self._lr_key = keys
        self._reference: Optional[float] = None

    def after_step(self):
        try:
            history = self.trainer.storage.history("total_loss")
        except KeyError:  # only the main process records losses
            return
        values = [v for v, _ in history.values()]
        if len(values) < self._window:
            return
        if self._reference is None:
            self._reference = min(values[:self._window])
        recent = statistics.median(values[-self._window:])
        if self._reference > 0 and recent > self._factor * self._reference:
            message = (
                f"training diverged at iteration {self.trainer.iter}: the total loss (median "
                f"of the last {self._window} iterations) is {recent:.4g}, more than "
                f"{self._factor_key}={self._factor:g} times its value at the start "
                f"({self._reference:.4g}). Lower {self._lr_key} (now {self._base_lr:g}) and "
                "start again (or --resume from a checkpoint written before the divergence).")
            logger.error(message)
            raise TrainingDivergedError(message)


class TrainingCurve(HookBase):
    """Draws ``training_curve.png`` from metrics.json once the writers have flushed it (register
    it after Detectron2's ``PeriodicWriter``)."""

    def __init__(self, output_dir: str):
        self._output_dir = output_dir

    def after_train(self):
        metrics = os.path.join(self._output_dir, "metrics.json")
        if not os.path.isfile(metrics):
            return
        try:
            picture = os.path.join(self._output_dir, "training_curve.png")
            path = plot_training_curve(metrics, picture)
            logger.info(f"Training curve written to {path}")
        except Exception as e:  # a plot must never turn a finished training into a failure
            logger.warning(f"Could not draw the training curve: {e}")


class _NoTracebackForDivergence(logging.Filter):
    """Detectron2's train loop logs every exception with its traceback; a diverging run is
    reported by the error message alone."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], FloatingPointError))


@contextlib.contextmanager
def divergence_reported(lr_key: str, lr: float) -> Iterator[None]:
    """
    Around a Detectron2 training loop: a diverging run (the divergence guard's error, or
    Detectron2's "Loss became infinite or NaN") ends with a :class:`TrainingDivergedError`
    whose message names the learning rate's setting ``lr_key`` and value, and Detectron2's
    loop logs it without a traceback.
    """
    loop_logger = logging.getLogger("detectron2.engine.train_loop")
    quiet = _NoTracebackForDivergence()
    loop_logger.addFilter(quiet)
    try:
        yield
    except TrainingDivergedError:
        raise
    except FloatingPointError as e:  # Detectron2's "Loss became infinite or NaN at ..."
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "non-finite loss"
        raise TrainingDivergedError(
            f"training diverged: {first_line} Lower {lr_key} (now {lr:g}) and start again "
            "(or --resume from a checkpoint written before the divergence).") from e
    finally:
        loop_logger.removeFilter(quiet)
