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
    - ``SOLVER.DIVERGENCE_FACTOR`` (default ``100.0``; ``0`` turns it off): training stops with
      an error naming the iteration and ``SOLVER.BASE_LR`` when the median total loss of the
      last 5 iterations exceeds this many times the loss at the start (the lowest of the first
      5 iterations): a diverging learning rate. A non-finite loss already stops Detectron2's
      trainer; it is reported the same way.
    """
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.DIVERGENCE_FACTOR = 100.0
