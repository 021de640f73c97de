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

from ..utils.precision import PRECISIONS, autocast_components, restore_components

__all__ = ["PRECISIONS", "enable_fast_inference", "disable_fast_inference"]


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
    autocast_components(model, PRECISIONS[precision], channels_last)
    if PRECISIONS[precision] is not None or channels_last:
        model._fpn_plugin_fast_inference = (precision, channels_last)
    return model


def disable_fast_inference(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_inference` (restores methods and contiguous weights)."""
    return restore_components(model)
