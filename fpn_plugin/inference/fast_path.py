"""
Reduced-precision inference for deployment.

The convolutions (backbone + neck, RPN head, box head, mask head) run under autocast in
bf16 (CPU, or CUDA) or fp16 (CUDA); every component hands fp32 tensors to the next, so the
range-sensitive math stays in fp32: anchor decoding, proposal NMS, ROIAlign sampling,
box-delta decoding and clipping, score thresholds, mask sigmoid and pasting. Optionally the
backbone runs in channels-last memory format, an exact fp32 saving on CPU (oneDNN prefers
NHWC for 3x3 convs).

The model's parameters are not converted, so the same weights serve both paths and
``disable_fast_inference`` restores the original behaviour exactly. The per-component
mechanism is ``fpn_plugin.utils.precision``, shared with the fast training path.
"""
from torch import nn

from ..utils.precision import (PRECISIONS, auto_inference_path, autocast_components,
                               restore_components, warn_if_emulated_bf16)

__all__ = ["PRECISIONS", "INFERENCE_PRECISIONS", "enable_fast_inference", "disable_fast_inference"]

# "auto": the fastest path measured for the device and this CPU (utils.precision.auto_inference_path).
INFERENCE_PRECISIONS = ("auto",) + tuple(PRECISIONS)


def enable_fast_inference(model: nn.Module, precision: str = "bf16",
                          channels_last: bool = False) -> nn.Module:
    """
    Switch a :class:`GeneralizedRCNN`-style model (backbone, proposal_generator.rpn_head,
    roi_heads.box_head / mask_head) to the fast inference path, in place.

    Args:
        model: an eval-mode model; its parameters stay fp32.
        precision: "fp32" (only ``channels_last`` applies), "bf16", "fp16" (CUDA only) or
            "auto": fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), exact fp32
            in channels-last on other CPUs (where bf16 is emulated: an explicit "bf16" there
            warns once).
        channels_last: run the backbone and heads' convs in NHWC memory format (with "auto",
            True forces channels-last on whatever "auto" picks).

    Returns:
        the same model.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"MODEL.FAST_INFERENCE.PRECISION: unknown value {precision!r}; "
            f"expected one of {list(INFERENCE_PRECISIONS)}"
        )
    if not isinstance(channels_last, bool):
        raise ValueError(f"MODEL.FAST_INFERENCE.CHANNELS_LAST must be True or False, got "
                         f"{channels_last!r}")
    device_type = next(model.parameters()).device.type
    if precision == "auto":
        precision, auto_channels_last = auto_inference_path(device_type)
        channels_last = channels_last or auto_channels_last
    else:
        warn_if_emulated_bf16(precision, device_type, "MODEL.FAST_INFERENCE.PRECISION")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            "MODEL.FAST_INFERENCE.PRECISION: 'fp16' needs a CUDA device (CPU has no fast fp16 "
            "convolutions); use 'bf16' on CPU"
        )
    if model.training:
        raise ValueError("enable_fast_inference: call model.eval() first (inference only)")
    autocast_components(model, PRECISIONS[precision], channels_last)
    if PRECISIONS[precision] is not None or channels_last:
        model._fpn_plugin_fast_inference = (precision, channels_last)
    return model


def disable_fast_inference(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_inference` (restores methods and contiguous weights)."""
    return restore_components(model)
