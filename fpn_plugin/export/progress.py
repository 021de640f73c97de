"""Progress lines with throughput and ETA, in the style of Detectron2's inference logs."""
import datetime
import logging
import time
from typing import Callable, Optional

__all__ = ["ProgressLogger", "format_eta"]


def format_eta(seconds: float) -> str:
    """Seconds -> "H:MM:SS" (rounded to whole seconds)."""
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class ProgressLogger:
    """
    Logs "what 12/40 (30%), 0.52 s/item, ETA 0:00:14" at most every ``period_s`` seconds,
    plus the first item and the last.

    The rate excludes the first ``warmup`` items (the first inference is much slower: lazy
    allocations), as long as later items exist to measure.

    Args:
        total (int or None): items expected; None when unknown (no ETA then).
        what (str): label of the lines, e.g. "export".
        logger (logging.Logger): where lines go (INFO).
        period_s (float): minimum seconds between lines.
        warmup (int): items left out of the rate.
        clock (callable): returns seconds; injectable for tests.
    """

    def __init__(self, total: Optional[int], what: str = "progress",
                 logger: Optional[logging.Logger] = None, period_s: float = 10.0,
                 warmup: int = 1, clock: Callable[[], float] = time.perf_counter):
        self.total = total
        self.what = what
        self.logger = logger or logging.getLogger(__name__)
        self.period_s = period_s
        self.warmup = warmup
        self._clock = clock
        self.done = 0
        self._start = clock()
        self._warm_start: Optional[float] = None
        self._last_log: Optional[float] = None

    def seconds_per_item(self) -> Optional[float]:
        """Mean seconds per item so far (after warm-up when possible); None before any item."""
        if self.done == 0:
            return None
        now = self._clock()
        if self._warm_start is not None and self.done > self.warmup:
            return (now - self._warm_start) / (self.done - self.warmup)
        return (now - self._start) / self.done

    def eta_seconds(self) -> Optional[float]:
        """Estimated seconds left; None when the total or the rate is unknown."""
        rate = self.seconds_per_item()
        if rate is None or self.total is None:
            return None
        return rate * max(self.total - self.done, 0)

    def message(self) -> str:
        """The current progress line."""
        if self.total:
            head = f"{self.what} {self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%)"
        else:
            head = f"{self.what} {self.done}"
        rate = self.seconds_per_item()
        if rate is not None:
            head += f", {rate:.3f} s/item"
        eta = self.eta_seconds()
        if eta is not None:
            head += f", ETA {format_eta(eta)}"
        return head

    def update(self, n: int = 1) -> None:
        """Record ``n`` finished items and log if a line is due."""
        self.done += n
        now = self._clock()
        if self._warm_start is None and self.done >= self.warmup:
            self._warm_start = now
        finished = self.total is not None and self.done >= self.total
        if self._last_log is None or finished or now - self._last_log >= self.period_s:
            self._last_log = now
            self.logger.info(self.message())

    def elapsed(self) -> float:
        """Seconds since creation."""
        return self._clock() - self._start
