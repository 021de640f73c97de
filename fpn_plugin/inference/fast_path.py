"""
Reduced-precision inference for deployment.

The convolutions (backbone + neck, RPN head, box head, mask head) run under autocast in
bf16 (CPU, or CUDA) or fp16 (CUDA); every component hands fp32 tensors to the next, so the
range-sensitive math stays in fp32: anchor decoding, proposal NMS, ROIAlign sampling,
box-delta decoding and clipping, score thresholds, mask sigmoid and pasting. Optionally the
backbone runs in channels-last memory format, an exact fp32 saving on CPU (oneDNN prefers
NHWC for 3x3 convs).

The model's parameters are not converted, so the same weights serve both paths and
``disable_fast_inference`` restores the original behaviour exactly.
"""
import types
from typing import Dict, List, Optional

import torch
from torch import nn

__all__ = ["PRECISIONS", "enable_fast_inference", "disable_fast_inference"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ORIGINAL = "_fpn_plugin_original_forward"


def _to_fp32(x):
    """fp32, contiguous NCHW copy of autocast outputs (tensors, or lists/dicts of tensors)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.dtype != torch.float32:
            return x.to(torch.float32, memory_format=torch.contiguous_format)
        return x.contiguous()
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def _wrap(module: nn.Module, method: str, device_type: str, dtype: torch.dtype,
          channels_last: bool) -> None:
    original = getattr(module, method)

    def run(self, *args, **kwargs):
        if channels_last:
            args = tuple(
                a.contiguous(memory_format=torch.channels_last)
                if isinstance(a, torch.Tensor) and a.dim() == 4 else a
                for a in args
            )
        # No weight-cast cache: each weight is cast where it is used and freed right after, so
        # the fast path never holds a second (bf16/fp16) copy of the whole model.
        with torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False):
            out = original(*args, **kwargs)
        return _to_fp32(out)

    saved: Dict[str, object] = module.__dict__.setdefault(_ORIGINAL, {})
    saved.setdefault(method, module.__dict__.get(method))  # None: the class method
    setattr(module, method, types.MethodType(run, module))


def enable_fast_inference(model: nn.Module, precision: str = "bf16",
                          channels_last: bool = False) -> nn.Module:
    """
    Switch a :class:`GeneralizedRCNN`-style model (backbone, proposal_generator.rpn_head,
    roi_heads.box_head / mask_head) to the fast inference path, in place.

    Args:
        model: an eval-mode model; its parameters stay fp32.
        precision: "fp32" (only ``channels_last`` applies), "bf16" or "fp16" (CUDA only).
        channels_last: run the backbone and heads' convs in NHWC memory format.

    Returns:
        the same model.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"MODEL.FAST_INFERENCE.PRECISION: unknown value {precision!r}; "
            f"expected one of {sorted(PRECISIONS)}"
        )
    device_type = next(model.parameters()).device.type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            "MODEL.FAST_INFERENCE.PRECISION: 'fp16' needs a CUDA device (CPU has no fast fp16 "
            "convolutions); use 'bf16' on CPU"
        )
    if model.training:
        raise ValueError("enable_fast_inference: call model.eval() first (inference only)")
    disable_fast_inference(model)
    dtype = PRECISIONS[precision]
    if dtype is None and not channels_last:
        return model
    if dtype is None:
        dtype = torch.float32  # autocast to fp32 is a no-op region; only the layout changes

    targets: List[Optional[nn.Module]] = [getattr(model, "backbone", None)]
    proposal_generator = getattr(model, "proposal_generator", None)
    targets.append(getattr(proposal_generator, "rpn_head", None))
    roi_heads = getattr(model, "roi_heads", None)
    targets.append(getattr(roi_heads, "box_head", None))
    mask_head = getattr(roi_heads, "mask_head", None)
    for module in targets:
        if module is not None:
            if channels_last:
                module.to(memory_format=torch.channels_last)
            _wrap(module, "forward", device_type, dtype, channels_last)
    if mask_head is not None:
        # Only the conv stack: the mask sigmoid, loss and pasting stay outside, in fp32.
        method = "layers" if callable(getattr(mask_head, "layers", None)) else "forward"
        if channels_last:
            mask_head.to(memory_format=torch.channels_last)
        _wrap(mask_head, method, device_type, dtype, channels_last)
    model._fpn_plugin_fast_inference = (precision, channels_last)
    return model


def disable_fast_inference(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_inference` (restores methods and contiguous weights)."""
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
    model.__dict__.pop("_fpn_plugin_fast_inference", None)
    return model
