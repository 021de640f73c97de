"""
Reduced precision per component: the one mechanism behind the fast inference path
(``fpn_plugin.inference``) and the fast training path (``fpn_plugin.engine.precision``).

A ``GeneralizedRCNN``-style model is a chain of components with fp32 math between them. Each
convolutional component (backbone + neck, RPN head, box head, the mask head's conv stack) runs
its forward under autocast, optionally with NHWC (channels-last) inputs and weights, and hands
fp32 NCHW tensors to the next. So everything between components stays fp32 in both directions
of autograd: anchor generation and matching, box encoding and decoding, NMS, ROIAlign
sampling, the box predictor, the losses, mask sigmoid and pasting.

Parameters are never converted: checkpoints stay fp32 and the same weights serve every path.
``restore_components`` undoes everything exactly.
"""
import contextlib
import functools
import logging
import types
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["PRECISIONS", "MARKERS", "conv_components", "autocast_components", "restore_components",
           "to_fp32", "cpu_flags", "cpu_has_native_bf16", "auto_inference_path",
           "auto_training_precision", "warn_if_emulated_bf16"]

logger = logging.getLogger(__name__)

# Precision names -> autocast dtype (None: no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ORIGINAL = "_fpn_plugin_original_forward"
# The attributes the two paths set on the model to say which set-up it has, e.g.
# ``model._fpn_plugin_fast_inference == ("bf16", True)``; one set-up at a time.
MARKERS = ("_fpn_plugin_fast_inference", "_fpn_plugin_fast_training")


# CPU flags of native bf16 matrix math; without them oneDNN emulates bf16, far slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# What emulated bf16 cost against fp32 where it was measured (benchmarks/bench_cpu_kinds.py,
# benchmarks/results/bench_cpu_kinds.md: R18 Mask R-CNN inference, one 256 px image, oneDNN/MKL/
# ATen limited to AVX2 on an AVX512-BF16 EPYC); named in the warning below.
EMULATED_BF16_SLOWDOWN = "about 50-100x slower than fp32"


@functools.lru_cache(maxsize=None)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> FrozenSet[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_has_native_bf16(flags: Optional[FrozenSet[str]] = None) -> bool:
    """Whether the CPU (``flags``: its feature flags, default this machine's) runs bf16 matrix
    math natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def auto_inference_path(device_type: str, native_bf16: Optional[bool] = None) -> Tuple[str, bool]:
    """
    ``(precision, channels_last)`` that the inference precision ``"auto"`` stands for: fp16 on
    CUDA; bf16 on a CPU with native bf16 (NCHW: channels-last added nothing there, 0.986x in
    benchmarks/results/bench_fast_path.md); on other CPUs exact fp32 in channels-last, faster
    than NCHW fp32 where bf16 is emulated (benchmarks/results/bench_cpu_kinds.md).

    Args:
        native_bf16: whether the CPU has native bf16 (default: :func:`cpu_has_native_bf16`).
    """
    if device_type == "cuda":
        return "fp16", False
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return ("bf16", False) if native else ("fp32", True)


def auto_training_precision(device_type: str, native_bf16: Optional[bool] = None) -> str:
    """The training precision ``"auto"`` stands for: fp16 on CUDA (with a gradient scaler, as
    Detectron2's ``AMPTrainer``), bf16 on a CPU with native bf16, fp32 on other CPUs."""
    if device_type == "cuda":
        return "fp16"
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return "bf16" if native else "fp32"


_WARNED_EMULATED = set()


def warn_if_emulated_bf16(precision: str, device_type: str, key: str,
                          native_bf16: Optional[bool] = None) -> bool:
    """
    Warn once per setting ``key`` when ``precision`` is an explicit bf16 on a CPU without native
    bf16 (emulated: far slower than fp32). Returns whether it is such a case.
    """
    if precision != "bf16" or device_type != "cpu":
        return False
    if cpu_has_native_bf16() if native_bf16 is None else native_bf16:
        return False
    if key not in _WARNED_EMULATED:
        _WARNED_EMULATED.add(key)
        logger.warning(
            f"{key} 'bf16': this CPU has no AVX512-BF16/AMX, so bf16 is emulated, "
            f"{EMULATED_BF16_SLOWDOWN} where measured (benchmarks/results/bench_cpu_kinds.md); "
            f"use 'auto' (fp32 + channels-last on this CPU) or 'fp32'")
    return True


def to_fp32(x):
    """fp32, contiguous NCHW version of autocast outputs (tensors, or lists/dicts of tensors)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.dtype != torch.float32:
            return x.to(torch.float32, memory_format=torch.contiguous_format)
        return x.contiguous()
    if isinstance(x, dict):
        return {k: to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_fp32(v) for v in x)
    return x


def conv_components(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """
    The convolutional components of a ``GeneralizedRCNN``-style model, as ``(module, method)``:
    ``backbone.forward`` (bottom-up + neck), ``proposal_generator.rpn_head.forward``,
    ``roi_heads.box_head.forward`` and the mask head's ``layers`` (its conv stack; the mask
    loss / sigmoid in its ``forward`` stay outside), each only where the model has it.
    """
    found: List[Tuple[nn.Module, str]] = []
    proposal_generator = getattr(model, "proposal_generator", None)
    roi_heads = getattr(model, "roi_heads", None)
    for module in (getattr(model, "backbone", None),
                   getattr(proposal_generator, "rpn_head", None),
                   getattr(roi_heads, "box_head", None)):
        if isinstance(module, nn.Module):
            found.append((module, "forward"))
    mask_head = getattr(roi_heads, "mask_head", None)
    if isinstance(mask_head, nn.Module):
        found.append((mask_head, "layers" if callable(getattr(mask_head, "layers", None))
                      else "forward"))
    return found


def _wrap(module: nn.Module, method: str, device_type: str, dtype: Optional[torch.dtype],
          channels_last: bool, training_only: bool) -> None:
    original = getattr(module, method)

    def region():
        if dtype is None:  # fp32: only the layout changes (CPU autocast has no fp32 mode)
            return contextlib.nullcontext()
        # No weight-cast cache: each weight is cast where it is used (once per forward) and
        # freed right after, so no second (bf16/fp16) copy of the whole model is held.
        return torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False)

    def run(self, *args, **kwargs):
        if training_only and not self.training:
            return original(*args, **kwargs)
        if channels_last:
            args = tuple(
                a.contiguous(memory_format=torch.channels_last)
                if isinstance(a, torch.Tensor) and a.dim() == 4 else a
                for a in args
            )
        with region():
            out = original(*args, **kwargs)
        return to_fp32(out)

    saved: Dict[str, object] = module.__dict__.setdefault(_ORIGINAL, {})
    saved.setdefault(method, module.__dict__.get(method))  # None: the class method
    setattr(module, method, types.MethodType(run, module))


def autocast_components(model: nn.Module, dtype: Optional[torch.dtype], channels_last: bool,
                        training_only: bool = False) -> nn.Module:
    """
    Run each of :func:`conv_components` under autocast to ``dtype`` (``None``: fp32, only the
    layout changes) and, with ``channels_last``, with NHWC weights and inputs; every component
    returns fp32 NCHW tensors. Replaces any previous set-up (:func:`restore_components` first).

    Args:
        model: the model; its device decides the autocast device type.
        dtype: ``torch.bfloat16``, ``torch.float16`` or ``None``.
        channels_last: convert the components' 4-D weights and inputs to NHWC (in place:
            parameters keep their identity, so an optimizer built earlier still holds them).
        training_only: autocast only while the component is in training mode (the training
            path: evaluation of the same model stays fp32, as with Detectron2's AMPTrainer).

    Returns:
        the same model.
    """
    restore_components(model)
    if dtype is None and not channels_last:
        return model
    device_type = next(model.parameters()).device.type
    for module, method in conv_components(model):
        if channels_last:
            module.to(memory_format=torch.channels_last)
        _wrap(module, method, device_type, dtype, channels_last, training_only)
    return model


def restore_components(model: nn.Module) -> nn.Module:
    """Undo :func:`autocast_components`: original methods, contiguous (NCHW) weights."""
    for module in model.modules():
        saved = module.__dict__.pop(_ORIGINAL, None)
        if not saved:
            continue
        for method, original in saved.items():
            if original is None:
                module.__dict__.pop(method, None)
            else:
                setattr(module, method, original)
        module.to(memory_format=torch.contiguous_format)
    for marker in MARKERS:
        model.__dict__.pop(marker, None)
    return model
