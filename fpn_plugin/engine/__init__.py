"""Training and evaluation: a Detectron2 ``DefaultTrainer`` for the plugin, and curve plots."""
from .plotting import plot_training_curve, read_metrics
from .trainer import Trainer, check_amp_config

__all__ = ["Trainer", "check_amp_config", "plot_training_curve", "read_metrics"]
