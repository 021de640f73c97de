"""
ONNX export of the traced model (``torch.onnx.export``, TorchScript-based exporter) and the
model's run in ONNX Runtime on CPU.

The traced Mask R-CNN (:func:`~fpn_plugin.deploy.models.trace_model`) is exported whole, with
the image's height and width and the number of detections as dynamic axes. Everything the
plugin's configs build has an ONNX conversion at opset >= 16 and runs in ONNX Runtime's CPU
provider: convolutions, the neck's resizes and fusions, anchors, ``batched_nms``
(``NonMaxSuppression``), the per-level top-k (``TopK``, ``ScatterElements``), ROIAlign with
``aligned=True`` (``RoiAlign`` with ``coordinate_transformation_mode="half_pixel"``, which needs
opset 16; below that torchvision exports the legacy, misaligned sampling) and the mask head.
Refused, with the reason: a reduced-precision fast path (ONNX Runtime's CPU provider has no
bfloat16/float16 ``Conv``; the exported model does not load), opsets below 16, and any
operator a future model uses that the exporter cannot convert (its error is passed on).
"""
import importlib.util
import os
import warnings
from typing import List, Optional, Tuple

import torch

from ..utils.files import remove_quietly, temp_path_beside
from .models import OUTPUT_NAMES, DeployError

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "OnnxRuntimeModel", "check_onnx_exportable",
           "check_onnx_options", "export_onnx", "onnx_unavailable_reason"]

DEFAULT_OPSET = 17
MIN_OPSET = 16  # RoiAlign's coordinate_transformation_mode (ROIAlignV2's half-pixel shift)
_INPUT_NAME = "image"


def onnx_unavailable_reason() -> Optional[str]:
    """Why ONNX export cannot run here (a package missing), or None."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"--format onnx needs the Python packages {missing} (PyPI: onnx, onnxruntime; "
                "`make setup` installs them from requirements/cpu-lock.txt)")
    return None


def check_onnx_options(opset: int) -> None:
    """Raise :class:`DeployError` unless the opset is usable and the ONNX packages import."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise DeployError(
            f"--opset {opset!r}: ONNX opset >= {MIN_OPSET} is needed (RoiAlign's half-pixel "
            "coordinate_transformation_mode, i.e. ROIAlignV2's aligned sampling, came in opset 16; "
            "torchvision exports aligned=True incorrectly below it)"
        )
    reason = onnx_unavailable_reason()
    if reason:
        raise DeployError(reason)


def check_onnx_exportable(model: torch.nn.Module, opset: int) -> None:
    """Raise :class:`DeployError` for what is known not to export or not to run in ONNX
    Runtime: :func:`check_onnx_options`, and a reduced-precision fast path on ``model``."""
    check_onnx_options(opset)
    fast = getattr(model, "_fpn_plugin_fast_inference", None)
    if fast is not None and fast[0] != "fp32":
        raise DeployError(
            f"MODEL.FAST_INFERENCE.PRECISION {fast[0]!r}: ONNX Runtime's CPU provider has no "
            f"{fast[0]} Conv (the exported graph fails to load); export ONNX in fp32 "
            "(MODEL.FAST_INFERENCE.PRECISION fp32), or deploy the fast path as TorchScript "
            "(--format torchscript --method trace)"
        )


def export_onnx(traced: torch.jit.ScriptModule, image: torch.Tensor, path: str,
                opset: int = DEFAULT_OPSET) -> None:
    """
    Export the traced model to ``path`` (written to a temporary file, then renamed).

    Args:
        traced: :func:`~fpn_plugin.deploy.models.trace_model`'s result, on the CPU.
        image: float32 ``(3, H, W)``, an input it was traced with (shapes only matter).
        opset: ONNX opset version (>= :data:`MIN_OPSET`).

    Raises:
        DeployError: the exporter could not convert the graph (the message names the
            operator the exporter names).
    """
    dynamic = {name: {0: "detections"} for name in OUTPUT_NAMES[:-1]}
    dynamic[_INPUT_NAME] = {1: "height", 2: "width"}
    tmp = temp_path_beside(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on traced constants
            torch.onnx.export(traced, (image,), tmp, dynamo=False, opset_version=opset,
                              input_names=[_INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic, do_constant_folding=True)
        import onnx

        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    except DeployError:
        raise
    except Exception as e:
        raise DeployError(
            f"ONNX export failed at opset {opset}: {type(e).__name__}: {_first_line(e)} "
            "(use --format torchscript for this model)"
        ) from e
    finally:
        remove_quietly(tmp)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class OnnxRuntimeModel:
    """An exported model in ONNX Runtime (CPU provider), called like the TorchScript one:
    ``model(image)`` -> the :data:`~fpn_plugin.deploy.models.OUTPUT_NAMES` tensors."""

    def __init__(self, path: str, num_threads: int = 0):
        """
        Args:
            path: the ``.onnx`` file.
            num_threads: intra-op threads (0: ONNX Runtime's default).

        Raises:
            DeployError: ONNX Runtime cannot load the model (the message says why).
        """
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are noise
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise DeployError(f"ONNX Runtime cannot load {path!r}: {_first_line(e)}") from e
        names = [o.name for o in self.session.get_outputs()]
        if tuple(names) != OUTPUT_NAMES:
            raise DeployError(f"{path!r} has outputs {names}, expected {list(OUTPUT_NAMES)}")

    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        arrays: List = self.session.run(None, {_INPUT_NAME: image.detach().cpu().numpy()})
        return tuple(torch.from_numpy(a) for a in arrays)
