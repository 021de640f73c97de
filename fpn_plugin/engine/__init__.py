"""Training and evaluation: a Detectron2 ``DefaultTrainer`` for the plugin, and curve plots."""
from .plotting import plot_training_curve, read_metrics
from .trainer import Trainer, TrainingDivergedError, check_amp_config, check_training_config

__all__ = ["Trainer", "TrainingDivergedError", "check_amp_config", "check_training_config",
           "plot_training_curve", "read_metrics"]
