"""Inference helpers: the reduced-precision fast path for deployment."""
from .fast_path import PRECISIONS, disable_fast_inference, enable_fast_inference

__all__ = ["PRECISIONS", "enable_fast_inference", "disable_fast_inference", "prepare_for_inference"]


def prepare_for_inference(model, cfg):
    """
    Put a built model in eval mode and apply ``cfg.MODEL.FAST_INFERENCE`` to it.

    Args:
        model: a model from ``detectron2.modeling.build_model(cfg)``, weights loaded.
        cfg: a config that went through ``add_fpn_plugin_config``.

    Returns:
        the same model.
    """
    model.eval()
    fast = cfg.MODEL.FAST_INFERENCE
    return enable_fast_inference(model, fast.PRECISION, fast.CHANNELS_LAST)
