"""Config keys of fpn_plugin.engine (the training loop)."""

# Accepted values of SOLVER.OPTIMIZER.
OPTIMIZERS = ("SGD", "ADAMW")
# Accepted values of SOLVER.AMP.PRECISION ("auto": "fp16" on CUDA, "bf16" on a CPU with native
# bf16, fp32 on other CPUs: fpn_plugin.utils.precision.auto_training_precision).
AMP_PRECISIONS = ("auto", "bf16", "fp16")


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
    - ``SOLVER.AMP.PRECISION`` (default ``"auto"``), read when Detectron2's
      ``SOLVER.AMP.ENABLED`` is ``True``: the autocast type of the convolutional components
      (backbone + neck, RPN head, box head, mask-head convs) in training. ``"bf16"`` (CPU with
      AVX512-BF16/AMX, or CUDA; no loss scaling), ``"fp16"`` (CUDA only, with a gradient
      scaler as Detectron2's ``AMPTrainer``), ``"auto"``: ``"fp16"`` on CUDA (what Detectron2's
      ``AMPTrainer`` does), ``"bf16"`` on a CPU with native bf16 (AVX512-BF16/AMX), fp32 on
      other CPUs (where bf16 is emulated; an explicit ``"bf16"`` there warns once). Losses, anchor matching, box decoding and
      ROIAlign sampling stay fp32; parameters and checkpoints stay fp32.
    - ``SOLVER.CHANNELS_LAST`` (default ``False``): train the convolutional components in
      channels-last (NHWC) memory format, with or without AMP (fp32 math either way; oneDNN
      runs NHWC convolutions faster on CPU). Checkpoints load into either layout.
    """
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.DIVERGENCE_FACTOR = 100.0
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.SOLVER.CHANNELS_LAST = False
