"""Facts about the Detectron2 installation the plugin runs on."""
import functools
import importlib

__all__ = ["check_cuda_available", "cuda_missing", "has_compiled_ops", "detectron2_version"]


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """
    Whether Detectron2's compiled extension (``detectron2._C``) is present.

    False when ``detectron2._C`` is missing or is the placeholder that fpn_plugin's CPU
    set-up installs (``IS_PLACEHOLDER``). COCO evaluation uses this to pick
    ``COCOEvaluator(use_fast_impl=...)``: the fast implementation needs the extension.
    """
    try:
        module = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    if getattr(module, "IS_PLACEHOLDER", False):
        return False
    # A real build is a compiled module, not Python source.
    origin = getattr(module, "__file__", "") or ""
    return not origin.endswith(".py")


def detectron2_version() -> str:
    import detectron2

    return detectron2.__version__


def cuda_missing(device) -> bool:
    """Whether ``device`` is a CUDA device and this machine has none."""
    import torch

    return str(device).startswith("cuda") and not torch.cuda.is_available()


def check_cuda_available(device, key: str = "MODEL.DEVICE") -> None:
    """Raise a ``ValueError`` naming ``key`` (the device's setting as the user wrote it) when
    ``device`` is a CUDA device and this machine has none."""
    if cuda_missing(device):
        raise ValueError(f"{key} is {str(device)!r} but CUDA is not available; use cpu")
