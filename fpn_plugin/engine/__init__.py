"""Training and evaluation: the YAML trainer (``Trainer``), the LazyConfig trainer
(``engine.lazy``), their shared hooks (``engine.hooks``) and settings check
(``engine.settings``), the fast training path (``engine.precision``), launch and DDP."""
from .hooks import DivergenceGuard, InvalidRecordsMetric, TrainingCurve, TrainingDivergedError
from .plotting import plot_training_curve, read_metrics
from .trainer import Trainer, check_amp_config, check_training_config

__all__ = ["DivergenceGuard", "InvalidRecordsMetric", "Trainer", "TrainingCurve",
           "TrainingDivergedError", "check_amp_config", "check_training_config",
           "plot_training_curve", "read_metrics"]
