"""Config keys of the fast inference path (``cfg.MODEL.FAST_INFERENCE``)."""
from detectron2.config import CfgNode as CN


def add_inference_config(cfg):
    """Add ``MODEL.FAST_INFERENCE``; the defaults keep Detectron2's exact fp32 inference."""
    cfg.MODEL.FAST_INFERENCE = CN()
    # "fp32" | "bf16" (CPU with AVX512-BF16/AMX, or CUDA) | "fp16" (CUDA only) | "auto" (fp16 on
    # CUDA, bf16 on a CPU with native bf16, fp32 + channels-last on other CPUs). Convs run under
    # autocast in this precision; box/mask math stays fp32.
    cfg.MODEL.FAST_INFERENCE.PRECISION = "fp32"
    # Run convs in channels-last (NHWC) memory format: exact fp32, faster on CPU.
    cfg.MODEL.FAST_INFERENCE.CHANNELS_LAST = False
