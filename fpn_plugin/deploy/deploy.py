"""
``deploy_model``: write a Mask R-CNN as TorchScript (traced or scripted) or ONNX, load the
written file back and check it against the eager model on sample images.

Output layout under ``output_dir``::

    model.ts | model.onnx   the deployed model (interface: fpn_plugin.deploy.models)
    summary.json            what was written and how, and per sample image the eager vs
                            deployed comparison (fpn_plugin.deploy.compare); "largest" holds
                            the largest differences over all images, "passed" the verdict

The files are written to temporary names and renamed when complete. The sample images are the
ones given (a folder or a registered dataset, the first ``max_images``), plus a crop of the
first one to 3/4 of its width: a size the model was not traced at, so a trace that baked in its
input size fails the check.

The steps, as in Detectron2's ``tools/deploy/export_model.py``: the model comes from
:class:`fpn_plugin.inference.predictor.Predictor`; one writer per format
(:func:`write_torchscript`, :func:`write_onnx`), one :func:`verify` of the written model
against the eager one on the samples, one :func:`build_summary`.
"""
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import detectron2
import torch

from ..config import with_plugin_defaults
from ..data.build import load_dataset_records
from ..data.images import check_max_image_pixels, read_image_checked
from ..evaluation.coco import check_dataset_registered
from ..inference.predictor import Predictor, build_test_resize, check_weights, resize_for_model
from ..utils.env import check_cuda_available
from ..utils.files import atomic_write_json, remove_quietly, remove_stale_temp_files, \
    temp_path_beside
from ..io.output import OutputFolder
from ..utils.paths import check_output_dir, list_folder_images
from . import d2_export
from .compare import DetectionDiff, Tolerances, compare_detections
from .fields import plugin_fields
from .models import (
    METHODS,
    OUTPUT_NAMES,
    DeployError,
    check_deployable,
    eager_outputs,
    outputs_to_instances,
    script_model,
    trace_model,
)
from .onnx_export import (
    DEFAULT_OPSET,
    OnnxRuntimeModel,
    check_onnx_exportable,
    check_onnx_options,
    export_onnx,
)

__all__ = ["FORMATS", "MODEL_FILES", "SUMMARY_FILE", "SampleImage", "build_summary",
           "deploy_model", "list_sample_images", "verify", "write_onnx", "write_torchscript"]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
SUMMARY_FILE = "summary.json"
CROP_FRACTION = 0.75


@dataclass
class SampleImage:
    """One image the deployed model is checked on."""

    name: str
    file_name: Optional[str]  # None for the crop made here
    original_size: Tuple[int, int]  # (height, width) the detections are pasted at
    image: torch.Tensor  # float32 (3, H, W): the model input (resized as DefaultPredictor does)


def _check_options(fmt: str, method: str, max_images: int, opset: int) -> None:
    if fmt not in FORMATS:
        raise DeployError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if method not in METHODS:
        raise DeployError(f"--method must be one of {list(METHODS)}, got {method!r}")
    if fmt == "onnx" and method != "trace":
        raise DeployError("--format onnx exports the traced model (Detectron2's ONNX path is "
                          "tracing too): use --method trace, or --format torchscript to script")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise DeployError(f"--max-images must be an integer >= 1, got {max_images!r}")
    if fmt == "onnx":
        check_onnx_options(opset)  # packages and opset, before any work


def _check_output_dir(output_dir: str) -> None:
    try:
        check_output_dir(output_dir)  # the entries' one check: the same rules and messages
    except ValueError as e:
        raise DeployError(str(e)) from e


def list_sample_images(cfg, *, dataset: Optional[str] = None, image_dir: Optional[str] = None,
                       max_images: int = 3) -> List[Tuple[str, str]]:
    """
    ``(name, file)`` of the first ``max_images`` images of ``image_dir`` (sorted by name) or
    of the registered ``dataset`` (default ``cfg.DATASETS.TEST[0]``).

    Raises:
        ValueError / FileNotFoundError: naming the folder or dataset.
    """
    if dataset is not None and image_dir is not None:
        raise DeployError("pass at most one of --dataset and --images")
    if image_dir is not None:
        files = list_folder_images(image_dir)[:max_images]
        return [(os.path.basename(f), f) for f in files]
    where = "--dataset"
    if dataset is None:
        if not len(cfg.DATASETS.TEST):
            raise DeployError("no sample images: pass --images DIR or --dataset NAME "
                              "(DATASETS.TEST is empty)")
        dataset, where = cfg.DATASETS.TEST[0], "DATASETS.TEST[0]"
    from ..data.shapes import register_shapes_if_named

    register_shapes_if_named(cfg, [dataset])
    check_dataset_registered(dataset)
    try:
        records = load_dataset_records(dataset).records
    except (OSError, AssertionError, ValueError) as e:  # e.g. COCO's files are not here
        raise DeployError(f"cannot read the sample images of {where} {dataset!r}: {e}; pass "
                          "--images DIR (or another --dataset)") from e
    if not records:
        raise DeployError(f"dataset {dataset!r} has no images")
    return [(str(r.get("image_id", r["file_name"])), r["file_name"]) for r in records[:max_images]]


def _load_samples(cfg, files: List[Tuple[str, str]]) -> List[SampleImage]:
    """Read and resize each image as Detectron2's DefaultPredictor does; add the crop."""
    resize = build_test_resize(cfg)
    max_pixels = check_max_image_pixels(cfg.INPUT.MAX_IMAGE_PIXELS)
    samples = []
    for name, path in files:
        image = read_image_checked(path, cfg.INPUT.FORMAT, max_pixels)
        tensor = resize_for_model(resize, image).float()
        samples.append(SampleImage(name, path, tuple(image.shape[:2]), tensor))
    first = samples[0].image
    width = max(int(first.shape[2] * CROP_FRACTION), 1)
    crop = first[:, :, :width].contiguous()
    samples.append(SampleImage(f"{samples[0].name} (crop to {width} px wide: untraced size)",
                               None, tuple(crop.shape[1:]), crop))
    return samples


def _save_torchscript(module, path: str) -> None:
    tmp = temp_path_beside(path)
    try:
        torch.jit.save(module, tmp)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def _largest(diffs: List[DetectionDiff]) -> Dict[str, Any]:
    return {
        "max_box_diff": max(d.max_box_diff for d in diffs),
        "max_score_diff": max(d.max_score_diff for d in diffs),
        "max_mask_diff": max(d.max_mask_diff for d in diffs),
        "unpaired": sum(d.unpaired for d in diffs),
        "pasted_mask_pixels_differing": sum(d.pasted_mask_pixels_differing for d in diffs),
        "pasted_mask_pixels": sum(d.pasted_mask_pixels for d in diffs),
        "bitwise_equal": all(d.bitwise_equal for d in diffs),
    }


def write_torchscript(model, image: torch.Tensor, path: str, method: str,
                      opset: int) -> Optional[Dict[str, type]]:
    """Trace ``model`` on ``image`` or script it; save it to ``path`` (atomically). Returns the
    scripted ``Instances`` fields (None when traced)."""
    if method == "script":
        fields = plugin_fields(model)
        _save_torchscript(script_model(model, fields), path)
        return fields
    _save_torchscript(trace_model(model, image), path)
    return None


def write_onnx(model, image: torch.Tensor, path: str, method: str, opset: int) -> None:
    """Trace ``model`` on ``image`` and export the trace to ONNX ``opset`` at ``path``."""
    traced = trace_model(model, image)
    logger.info("exporting to ONNX (opset %d)", opset)
    export_onnx(traced, image, path, opset)


# format -> (writer, loader of the written file onto a device)
_FORMATS: Dict[str, Tuple[Callable, Callable]] = {
    "torchscript": (write_torchscript,
                    lambda path, device: torch.jit.load(path, map_location=device)),
    "onnx": (write_onnx, lambda path, device: OnnxRuntimeModel(path)),
}


def verify(deployed, eager, samples: List[SampleImage]) -> List[DetectionDiff]:
    """
    Run the deployed model (TorchScript module or ONNX Runtime session) and the eager model
    on every sample; one :class:`~fpn_plugin.deploy.compare.DetectionDiff` per sample, pasted
    at the sample's original size.
    """
    diffs = []
    for k, sample in enumerate(samples):
        image = sample.image.to(eager.device)
        want = eager_outputs(eager, image)
        with torch.no_grad():
            got = outputs_to_instances(deployed(image))
        diff = compare_detections(want, got, *sample.original_size)
        diffs.append(diff)
        logger.info("image %d/%d %s: %d eager / %d deployed detections, largest box diff %.3g "
                    "px, score %.3g, mask %.3g", k + 1, len(samples), sample.name,
                    diff.eager_detections, diff.deployed_detections, diff.max_box_diff,
                    diff.max_score_diff, diff.max_mask_diff)
    return diffs


@dataclass
class DeployedModel:
    """What was written, and how (the summary's head)."""

    model_file: str
    fmt: str
    method: str
    config_file: Optional[str]
    weights: str
    device: str
    opset: int
    fast_inference: Optional[Tuple[str, bool]]
    scripted_fields: Optional[Dict[str, type]]


_INTERFACE = {
    "input": "image: float32 (3, H, W), INPUT.FORMAT channel order, resized as "
             "DefaultPredictor does (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)",
    "outputs": list(OUTPUT_NAMES),
    "postprocess": "fpn_plugin.deploy.postprocess (Detectron2's detector_postprocess) "
                   "scales boxes to the original image and pastes the masks",
}


def build_summary(deployed: DeployedModel, samples: List[SampleImage],
                  diffs: List[DetectionDiff], tolerances: Tolerances,
                  seconds: Dict[str, float]) -> Dict[str, Any]:
    """The summary.json of a deployment: the model written, versions, per-image comparison,
    the largest differences and the verdict ``passed``."""
    onnx = deployed.fmt == "onnx"
    fast, fields = deployed.fast_inference, deployed.scripted_fields
    images = [dict(name=sample.name, file_name=sample.file_name,
                   input_size=list(sample.image.shape[1:]),
                   original_size=list(sample.original_size),
                   traced_on=deployed.method == "trace" and k == 0, **diff.to_dict())
              for k, (sample, diff) in enumerate(zip(samples, diffs))]
    return {
        "model_file": deployed.model_file,
        "format": deployed.fmt,
        "method": deployed.method,
        "config_file": deployed.config_file,
        "weights": deployed.weights,
        "device": deployed.device,
        "opset": deployed.opset if onnx else None,
        "fast_inference": {"precision": fast[0], "channels_last": fast[1]} if fast else None,
        "scripted_fields": sorted(fields) if fields is not None else None,
        "interface": _INTERFACE,
        "versions": {
            "torch": torch.__version__,
            "detectron2": detectron2.__version__,
            "detectron2_export_helpers": d2_export.source(),
            "onnxruntime": _version("onnxruntime") if onnx else None,
            "python": platform.python_version(),
        },
        "tolerances": asdict(tolerances),
        "images": images,
        "largest": _largest(diffs),
        "passed": all(d.within(tolerances) for d in diffs),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _deploy_config(cfg, fmt: str):
    """The plugin's defaults added; ONNX is traced and checked on the CPU."""
    cfg = with_plugin_defaults(cfg)
    if fmt == "onnx" and str(cfg.MODEL.DEVICE) != "cpu":
        logger.info("--format onnx: tracing and checking on the CPU (ONNX Runtime's CPU "
                    "provider), not on MODEL.DEVICE %r", cfg.MODEL.DEVICE)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def deploy_model(cfg, weights: Optional[str] = None, *, output_dir: str,
                 fmt: str = "torchscript", method: str = "trace",
                 dataset: Optional[str] = None, image_dir: Optional[str] = None,
                 max_images: int = 3, opset: int = DEFAULT_OPSET,
                 tolerances: Tolerances = Tolerances(), config_file: Optional[str] = None
                 ) -> Dict[str, Any]:
    """
    Write the model in ``fmt`` and check the written file against the eager model.

    Args:
        cfg (CfgNode): the model's config. MODEL.DEVICE is where the model is traced and
            checked (ONNX: always the CPU); MODEL.FAST_INFERENCE applies (trace only);
            INPUT.MIN/MAX_SIZE_TEST the resize of the sample images.
        weights (str): checkpoint; None uses MODEL.WEIGHTS. Loaded with
            :class:`~fpn_plugin.checkpoint.SafeDetectionCheckpointer` (no code from the
            file runs), strictly.
        output_dir (str): created if missing; ``model.ts``/``model.onnx`` and
            ``summary.json`` are replaced.
        fmt (str): "torchscript" or "onnx".
        method (str): "trace" (Detectron2's ``TracingAdapter``) or "script"
            (``scripting_with_instances``, TorchScript only).
        dataset, image_dir: where the sample images come from (at most one; neither:
            ``cfg.DATASETS.TEST[0]``).
        max_images (int): sample images taken (>= 1); a crop of the first is added.
        opset (int): ONNX opset (>= 16).
        tolerances: what the check allows (:class:`~fpn_plugin.deploy.compare.Tolerances`).
        config_file (str): recorded in the summary.

    Returns:
        dict: the summary also written to ``summary.json``; ``passed`` is the verdict.

    Raises:
        DeployError (a ValueError), FileNotFoundError, CheckpointError: bad input or a model
            that cannot be deployed this way; the message names the option, key or file.
    """
    start = time.perf_counter()
    _check_options(fmt, method, max_images, opset)
    cfg = _deploy_config(cfg, fmt)
    weights = check_weights(weights or cfg.MODEL.WEIGHTS)
    check_cuda_available(cfg.MODEL.DEVICE)
    _check_output_dir(output_dir)
    remove_stale_temp_files(output_dir)
    files = list_sample_images(cfg, dataset=dataset, image_dir=image_dir, max_images=max_images)
    samples = _load_samples(cfg, files)

    logger.info("building the model and loading %s", weights)
    model = Predictor(cfg, weights).model
    check_deployable(model, method)
    if fmt == "onnx":
        check_onnx_exportable(model, opset)
    folder = OutputFolder(output_dir)  # the writing boundary
    path = folder.file(MODEL_FILES[fmt])
    first = samples[0].image.to(model.device)
    logger.info("%s the model on %s (input %s)", "tracing" if method == "trace" else "scripting",
                samples[0].name, tuple(first.shape))
    write, load = _FORMATS[fmt]
    fields = write(model, first, path, method, opset)
    export_seconds = time.perf_counter() - start

    logger.info("loading %s back and checking it against the eager model", path)
    diffs = verify(load(path, model.device), model, samples)
    deployed = DeployedModel(path, fmt, method, config_file, weights, str(model.device), opset,
                             getattr(model, "_fpn_plugin_fast_inference", None), fields)
    summary = build_summary(deployed, samples, diffs, tolerances,
                            {"export": export_seconds, "total": time.perf_counter() - start})
    atomic_write_json(folder.file(SUMMARY_FILE), summary)
    folder.record(MODEL_FILES[fmt], SUMMARY_FILE)
    return summary


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None
