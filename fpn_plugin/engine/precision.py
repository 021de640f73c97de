"""
The fast training path: mixed precision (bf16 on CPU or CUDA, fp16 on CUDA) and channels-last.

- :func:`enable_fast_training` sets a model up: its convolutional components (backbone + neck,
  RPN head, box head, mask-head convs) run under autocast while in training mode, with NHWC
  weights and inputs if asked, and hand fp32 tensors on (``fpn_plugin.utils.precision``, the
  mechanism the fast inference path uses too). On CPU the ROI poolers' ROIAlign becomes
  :class:`~fpn_plugin.layers.roi_align.SparseROIAlign` (the same sampling as a sparse matrix
  product, whose backward is multithreaded: torchvision's runs in one thread). Anchor
  matching, box encoding/decoding, ROIAlign sampling, the box predictor and every loss stay
  fp32; parameters, gradients, optimizer state and checkpoints stay fp32. In eval mode the
  model runs fp32 with torchvision's ROIAlign (evaluation during training is unchanged, as with
  Detectron2's ``AMPTrainer``; ``MODEL.FAST_INFERENCE`` is the inference switch).
- :func:`make_train_loop` is the loop: Detectron2's ``SimpleTrainer`` for fp32 and bf16 (bf16
  has fp32's exponent range: no loss scaling), :class:`GradScalerTrainer` for fp16.
- :func:`build_train_loop` does both and the DDP wrapping in between, for entries that build
  their own trainer (the LazyConfig entry).

``fpn_plugin.engine.Trainer`` applies ``SOLVER.AMP.ENABLED`` / ``SOLVER.AMP.PRECISION`` /
``SOLVER.CHANNELS_LAST`` with these.
"""
import logging
import time
from typing import Optional

import torch
from detectron2.engine import SimpleTrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..layers.roi_align import restore_roi_align, use_sparse_roi_align
from ..utils.precision import (PRECISIONS, auto_training_precision, autocast_components,
                               cpu_has_native_bf16, restore_components, warn_if_emulated_bf16)

__all__ = ["TRAINING_PRECISIONS", "YAML_KEYS", "check_training_precision", "resolve_precision",
           "enable_fast_training", "disable_fast_training", "GradScalerTrainer",
           "make_train_loop", "build_train_loop", "cpu_has_native_bf16"]

logger = logging.getLogger(__name__)

TRAINING_PRECISIONS = tuple(PRECISIONS)  # "fp32", "bf16", "fp16"


def resolve_precision(precision: str, device_type: str) -> str:
    """``"auto"`` -> what :func:`fpn_plugin.utils.precision.auto_training_precision` picks for
    the device and this CPU (fp16 on CUDA, bf16 on a CPU with native bf16, else fp32)."""
    if precision == "auto":
        return auto_training_precision(device_type)
    return precision


# The config keys errors name: the YAML entry's (the LazyConfig entry passes its own).
YAML_KEYS = ("SOLVER.AMP.PRECISION", "SOLVER.CHANNELS_LAST")


def check_training_precision(precision: str, device_type: str, channels_last: bool,
                             keys=YAML_KEYS) -> str:
    """
    Validate a training precision for a device; return it (``"auto"`` resolved).

    Args:
        keys: the names of the precision and channels-last settings in the caller's config,
            which the errors name (default: the YAML keys; e.g. ``("train.amp.precision",
            "train.channels_last")`` for a LazyConfig).
    """
    precision_key, channels_last_key = keys
    if not isinstance(channels_last, bool):
        raise ValueError(f"{channels_last_key} must be True or False, got {channels_last!r}")
    if precision != "auto" and precision not in TRAINING_PRECISIONS:
        raise ValueError(f"{precision_key} must be one of "
                         f"{('auto',) + TRAINING_PRECISIONS}, got {precision!r}")
    precision = resolve_precision(precision, device_type)
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"{precision_key} 'fp16' needs a CUDA device, but the model is on "
            f"{device_type!r} (CPUs have no fast fp16 convolutions and fp16 needs loss "
            "scaling): use 'bf16' (or 'auto') on CPU")
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{precision_key} 'bf16': this CUDA device has no bf16 support; "
                         "use 'fp16'")
    return precision


def enable_fast_training(model: nn.Module, precision: str = "bf16",
                         channels_last: bool = False) -> nn.Module:
    """
    Set ``model`` up for the fast training path, in place (see the module docstring). Call it
    before wrapping the model in DDP (DDP fixes its gradient buckets' layout then) and
    preferably before building the optimizer (parameters keep their identity either way).

    Args:
        model: a ``GeneralizedRCNN``-style model (not DDP-wrapped); parameters stay fp32.
        precision: "fp32" (only ``channels_last`` applies), "bf16", "fp16" (CUDA) or "auto".
        channels_last: NHWC weights and activations in the convolutional components.

    Returns:
        the same model.
    """
    if isinstance(model, DistributedDataParallel):
        raise ValueError("enable_fast_training: pass the model before create_ddp_model / DDP "
                         "wrapping (DDP fixes the gradient layout when it is built)")
    device_type = next(model.parameters()).device.type
    precision = check_training_precision(precision, device_type, channels_last)
    warn_if_emulated_bf16(precision, device_type, "the training precision (SOLVER.AMP.PRECISION / train.amp.precision)")
    autocast_components(model, PRECISIONS[precision], channels_last, training_only=True)
    if device_type == "cpu":  # torchvision's CPU ROIAlign backward runs in one thread
        use_sparse_roi_align(model)
    if PRECISIONS[precision] is not None or channels_last:
        model._fpn_plugin_fast_training = (precision, channels_last)
    return model


def disable_fast_training(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_training` (original methods, contiguous weights, Detectron2's
    ROIAlign in the poolers)."""
    restore_roi_align(model)
    return restore_components(model)


class GradScalerTrainer(SimpleTrainer):
    """
    ``SimpleTrainer`` with a gradient scaler, for fp16 training: the loss is scaled before the
    backward pass, gradients are unscaled before the optimizer step (so gradient clipping
    sees their true values) and a step with inf/NaN gradients is skipped while the scale
    shrinks. Autocast itself is on the model's components (:func:`enable_fast_training`), not
    around the whole forward. The scaler's state is checkpointed with the optimizer's.
    """

    def __init__(self, model, data_loader, optimizer, grad_scaler=None):
        super().__init__(model, data_loader, optimizer)
        self.grad_scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler("cuda")

    def run_step(self):
        assert self.model.training, "[GradScalerTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            losses, loss_dict = loss_dict, {"total_loss": loss_dict}
        else:
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        after_backward = getattr(self, "after_backward", None)  # Detectron2 main's hook
        if after_backward is not None:
            after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:  # absent when resuming an fp32 / bf16 checkpoint
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def make_train_loop(model: nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                    precision: str = "fp32", grad_scaler=None) -> SimpleTrainer:
    """
    The training loop for a model set up by :func:`enable_fast_training` (and DDP-wrapped
    if distributed): :class:`GradScalerTrainer` for "fp16", ``SimpleTrainer`` otherwise.

    Args:
        precision: the precision the model was set up with ("auto" resolves by the model's
            device, as in :func:`enable_fast_training`).
        grad_scaler: fp16 only: a ``torch.amp.GradScaler`` (default: a new one).
    """
    device_type = next(model.parameters()).device.type
    precision = resolve_precision(precision, device_type)
    if precision == "fp16":
        return GradScalerTrainer(model, data_loader, optimizer, grad_scaler=grad_scaler)
    if grad_scaler is not None:
        raise ValueError(f"a grad_scaler is only used with precision 'fp16', not {precision!r}")
    return SimpleTrainer(model, data_loader, optimizer)


def build_train_loop(model: nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                     precision: str = "fp32", channels_last: bool = False,
                     ddp_kwargs: Optional[dict] = None, grad_scaler=None) -> SimpleTrainer:
    """
    The whole training set-up for entries that build their own trainer (the LazyConfig entry):
    :func:`enable_fast_training`, then DDP wrapping when there are several processes (the
    plugin's CPU-capable ``create_ddp_model``), then :func:`make_train_loop`.

    Args:
        model: the bare model (not yet DDP-wrapped), on its device.
        data_loader, optimizer: as for Detectron2's ``SimpleTrainer``.
        precision: "fp32", "bf16", "fp16" (CUDA) or "auto" (fp16 on CUDA, bf16 on a CPU with
            native bf16, else fp32).
        channels_last: NHWC convolutional components.
        ddp_kwargs: arguments of ``create_ddp_model`` (e.g. a LazyConfig's ``train.ddp``).
        grad_scaler: fp16 only, see :func:`make_train_loop`.

    Returns:
        the loop (``trainer.model`` is the DDP-wrapped model when distributed).
    """
    from .ddp import create_ddp_model

    enable_fast_training(model, precision, channels_last)
    ddp_model = create_ddp_model(model, **(ddp_kwargs or {}))
    return make_train_loop(ddp_model, data_loader, optimizer, precision, grad_scaler)
