"""Config keys of fpn_plugin.engine (the training loop)."""

# Accepted values of SOLVER.OPTIMIZER.
OPTIMIZERS = ("SGD", "ADAMW")


def add_engine_config(cfg):
    """
    Add fpn_plugin.engine's keys to ``cfg`` (in place).

    - ``SOLVER.OPTIMIZER`` (default ``"SGD"``): the optimizer ``fpn_plugin.engine.Trainer``
      builds. ``"SGD"`` is Detectron2's own (``SOLVER.MOMENTUM``, ``SOLVER.NESTEROV``);
      ``"ADAMW"`` is ``torch.optim.AdamW`` with decoupled weight decay
      (``SOLVER.WEIGHT_DECAY``, ``SOLVER.WEIGHT_DECAY_NORM``, ``SOLVER.BIAS_LR_FACTOR`` and
      gradient clipping apply to both). Training from scratch on a short schedule (the CPU
      demo) converges several times faster with AdamW.
    """
    cfg.SOLVER.OPTIMIZER = "SGD"
