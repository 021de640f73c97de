"""
``export_masks``: run a Detectron2 model over a registered dataset or a folder of images and
write COCO results, instance-id PNGs and overlays, streaming and atomically.

Output layout under ``output_dir``::

    coco_instances_results.json   COCO results (RLE segmentation, bbox, score, category_id,
                                  image_id) for every detection; pycocotools' loadRes reads it
    images.json                   one record per exported image: id, file_name, height, width,
                                  name (the stem used for the per-image files below)
    instance_maps/<name>.png      16-bit instance ids (0 = background, k = k-th instance listed
                                  in <name>.json); instances with score >= score_threshold
    instance_maps/<name>.json     those instances: id, category_id, category, score, bbox (XYWH)
    instance_masks/<name>/<k>.png one 0/255 PNG per instance k (only with binary_masks=True)
    overlays/<name>.jpg           the image with those instances drawn (overlays=True)
    summary.json                  counts, skipped images with reasons, timings, metrics

Every file is written to a temporary name and renamed when complete, so an interrupted
export never leaves a truncated file that looks complete (the results JSON of a previous
complete run stays as it was). The JSON files are also fsynced; the many small per-image files
are not (a power loss, unlike a crash of the process, may lose the last few of them).
"""
import logging
import math
import os
import time
from contextlib import ExitStack
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..checkpoint import CheckpointError, SafeDetectionCheckpointer
from ..inference import prepare_for_inference
from ..evaluation.coco import check_dataset_registered
from .coco_results import contiguous_to_dataset_ids, instances_to_coco_results
from .masks import instance_id_map, score_order
from .progress import ProgressLogger
from .writers import StreamingJSONArrayWriter, atomic_write_json, write_image

__all__ = ["IMAGE_EXTENSIONS", "RESULTS_FILE", "export_masks", "list_folder_images"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"
SUMMARY_FILE = "summary.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_folder_images(image_dir: str) -> List[str]:
    """
    Image files directly inside ``image_dir`` (by extension, case-insensitive), sorted by name.

    Raises:
        FileNotFoundError: ``image_dir`` is not a folder.
        ValueError: it holds no image files.
    """
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir!r}")
    files = sorted(
        os.path.join(image_dir, f) for f in os.listdir(image_dir)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(image_dir, f))
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir!r}")
    return files


class _Inference:
    """build_model + safe strict weight loading + test-time resize, like DefaultPredictor."""

    def __init__(self, cfg, weights: str):
        self.model = build_model(cfg)
        self.model.eval()
        SafeDetectionCheckpointer(self.model, strict=True).load(weights, checkpointables=[])
        if "FAST_INFERENCE" in cfg.MODEL:  # configs without the plugin's keys run plain fp32
            prepare_for_inference(self.model, cfg)
        self.augmentations = T.AugmentationList(d2_utils.build_augmentation(cfg, is_train=False))

    def __call__(self, image: np.ndarray, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """
        Args:
            image (np.ndarray): (H, W, C) uint8 in cfg.INPUT.FORMAT.
            inputs (dict): "height"/"width" the outputs are scaled to, plus ids for evaluators.

        Returns:
            dict: the model's output for the image ("instances" on the model's device).
        """
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        resized = aug_input.image
        model_input = dict(inputs)
        model_input["image"] = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        with torch.no_grad():
            return self.model([model_input])[0]


def _unique_name(file_name: str, image_id, used: set) -> str:
    name = os.path.splitext(os.path.basename(file_name))[0] or str(image_id)
    if name in used:
        name = f"{name}_{image_id}"
    used.add(name)
    return name


def _check_inputs(cfg, weights: Optional[str], dataset: Optional[str],
                  image_dir: Optional[str]) -> Tuple[str, List[Dict[str, Any]]]:
    """Validate everything cheap to validate before building the model; list the images."""
    if (dataset is None) == (image_dir is None):
        raise ValueError("pass exactly one of dataset= (a registered name) and image_dir=")
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError("no weights: pass weights= (or --weights) or set MODEL.WEIGHTS")
    if "://" not in weights and not os.path.isfile(weights):
        raise CheckpointError(f"checkpoint file not found: {weights!r}")
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {device!r} but CUDA is not available; "
                         "set MODEL.DEVICE to 'cpu'")
    if dataset is not None:
        check_dataset_registered(dataset)
        # Detectron2 dataset dicts: small per image (paths, sizes, annotations), not pixels.
        items = [
            {"image_id": d.get("image_id", i), "file_name": d["file_name"],
             "height": d.get("height"), "width": d.get("width")}
            for i, d in enumerate(DatasetCatalog.get(dataset))
        ]
    else:
        items = [{"image_id": i + 1, "file_name": f, "height": None, "width": None}
                 for i, f in enumerate(list_folder_images(image_dir))]
    return weights, items


def _check_num_classes(cfg, to_dataset: Optional[Dict[int, int]], metadata_name: str) -> None:
    if to_dataset is not None and len(to_dataset) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but "
            f"{metadata_name!r} has {len(to_dataset)} classes"
        )


def _load_metadata(name: str) -> None:
    """COCO-JSON datasets get their class names and id mapping only when loaded; loading
    the dataset dicts once fills them. A failure only costs the names (logged)."""
    if name not in DatasetCatalog.list():
        return
    try:
        DatasetCatalog.get(name)
    except Exception as e:  # e.g. its files are not on this machine
        logger.warning("class names of %r unavailable (%s: %s); writing contiguous ids",
                       name, type(e).__name__, e)


def _finite_or_none(obj):
    """Metrics may hold NaN, which strict JSON cannot carry: write null instead."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def export_masks(cfg, weights: Optional[str] = None, *, output_dir: str,
                 dataset: Optional[str] = None, image_dir: Optional[str] = None,
                 score_threshold: float = 0.5, binary_masks: bool = False,
                 overlays: bool = True, evaluator=None, metadata_name: Optional[str] = None,
                 max_images: Optional[int] = None,
                 progress_period_s: float = 10.0) -> Dict[str, Any]:
    """
    Run inference and export masks (see the module docstring for the files written).

    Args:
        cfg (CfgNode): the model's config (plugin keys added if it uses plugin components).
            MODEL.DEVICE is where inference runs; INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST the resize.
        weights (str): checkpoint file; None uses MODEL.WEIGHTS. Loaded without running code
            from the file, and strictly: keys or shapes that differ from the model are an error.
        output_dir (str): created if missing; existing files of the same names are replaced.
        dataset (str): a name registered in DatasetCatalog; its image ids and its category ids
            (``thing_dataset_id_to_contiguous_id``) are written, so the results JSON evaluates
            against its annotations. Exclusive with ``image_dir``.
        image_dir (str): a folder of images (not recursive); image ids are 1, 2, ... in name
            order. Category ids are those of ``metadata_name``'s dataset if it has a mapping,
            else the model's contiguous ids.
        score_threshold (float): minimum score of the instances drawn in the id PNGs, binary
            masks and overlays. The results JSON keeps every detection (AP needs them).
        binary_masks (bool): also write one 0/255 PNG per instance.
        overlays (bool): write a JPEG of the masks drawn on the image.
        evaluator (DatasetEvaluator): optional, e.g. ``build_coco_evaluator(dataset, dir)``; fed
            the same predictions, its ``evaluate()`` result goes to the summary ("metrics").
            COCOEvaluator keeps all predictions in memory; for very large datasets evaluate the
            written JSON with ``fpn_plugin.evaluation.evaluate_coco_results_json`` instead.
        metadata_name (str): dataset whose metadata names the classes; default ``dataset``,
            else cfg.DATASETS.TEST[0] when registered.
        max_images (int): export only the first N images (quick checks).
        progress_period_s (float): seconds between progress lines (with ETA).

    Returns:
        dict: the summary also written to ``summary.json`` (num_images, num_exported,
        num_detections, skipped: [{file_name, error}], results_json, seconds, metrics).

    Raises:
        ValueError: bad arguments, unregistered dataset, empty folder, class-count mismatch,
            or no image could be read.
        FileNotFoundError: ``image_dir`` does not exist.
        CheckpointError / CheckpointMismatchError: missing, corrupt or mismatched weights.
    """
    weights, items = _check_inputs(cfg, weights, dataset, image_dir)
    if evaluator is not None and dataset is None:
        raise ValueError("evaluator= needs dataset= (a folder of images has no annotations)")
    if max_images is not None:
        items = items[:max_images]

    if dataset is not None:
        metadata_name = metadata_name or dataset
    elif metadata_name is None and len(cfg.DATASETS.TEST) and \
            cfg.DATASETS.TEST[0] in MetadataCatalog.list():
        metadata_name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(metadata_name) if metadata_name else None
    if dataset is None and metadata is not None and not metadata.get("thing_classes"):
        _load_metadata(metadata_name)
    to_dataset = contiguous_to_dataset_ids(metadata)
    _check_num_classes(cfg, to_dataset, metadata_name)
    class_names = metadata.get("thing_classes") if metadata is not None else None

    inference = _Inference(cfg, weights)
    os.makedirs(output_dir, exist_ok=True)
    results_path = os.path.join(output_dir, RESULTS_FILE)
    logger.info("exporting %d images from %s to %s", len(items),
                f"dataset {dataset!r}" if dataset else repr(image_dir), output_dir)
    if evaluator is not None:
        evaluator.reset()

    used_names: set = set()
    skipped: List[Dict[str, str]] = []
    num_detections = 0
    progress = ProgressLogger(len(items), "export", logger, period_s=progress_period_s)
    start = time.perf_counter()
    with ExitStack() as stack:
        results = stack.enter_context(StreamingJSONArrayWriter(results_path))
        images = stack.enter_context(
            StreamingJSONArrayWriter(os.path.join(output_dir, IMAGES_FILE)))
        for item in items:
            try:
                image = _read_checked(item, cfg.INPUT.FORMAT)
            except Exception as e:  # any unreadable input is reported and skipped
                reason = f"{type(e).__name__}: {e}"
                logger.warning("skipping %s: %s", item["file_name"], reason)
                skipped.append({"file_name": item["file_name"], "error": reason})
                progress.update()
                continue
            height, width = image.shape[:2]
            inputs = {"image_id": item["image_id"], "file_name": item["file_name"],
                      "height": height, "width": width}
            outputs = inference(image, inputs)
            instances = outputs["instances"].to("cpu")
            for record in instances_to_coco_results(instances, item["image_id"], to_dataset):
                results.write(record)
                num_detections += 1
            if evaluator is not None:
                evaluator.process([inputs], [outputs])

            name = _unique_name(item["file_name"], item["image_id"], used_names)
            images.write(dict(id=item["image_id"], name=name, **{
                k: inputs[k] for k in ("file_name", "height", "width")}))
            _write_image_outputs(output_dir, name, item, image, cfg.INPUT.FORMAT, instances,
                                 score_threshold, to_dataset, class_names, metadata,
                                 binary_masks, overlays)
            progress.update()
        if len(skipped) == len(items):
            raise ValueError(f"none of the {len(items)} images could be read; first error: "
                             f"{skipped[0]['file_name']}: {skipped[0]['error']}")
        # Leaving the ExitStack commits images.json, then the results JSON.

    summary: Dict[str, Any] = {
        "dataset": dataset,
        "image_dir": image_dir,
        "weights": weights,
        "num_images": len(items),
        "num_exported": len(items) - len(skipped),
        "num_detections": num_detections,
        "skipped": skipped,
        "results_json": results_path,
        "category_ids": "dataset" if to_dataset is not None else "contiguous",
        "seconds": round(time.perf_counter() - start, 3),
    }
    if evaluator is not None:
        summary["metrics"] = _finite_or_none(dict(evaluator.evaluate() or {}))
    atomic_write_json(os.path.join(output_dir, SUMMARY_FILE), summary, indent=2)
    logger.info("exported %d/%d images (%d detections) in %.1f s; skipped %d",
                summary["num_exported"], len(items), num_detections, summary["seconds"],
                len(skipped))
    for s in skipped:
        logger.warning("skipped %s: %s", s["file_name"], s["error"])
    return summary


def _read_checked(item: Dict[str, Any], image_format: str) -> np.ndarray:
    """Read an image; a dataset's recorded size must match it (as Detectron2's mapper checks)."""
    image = d2_utils.read_image(item["file_name"], format=image_format)
    d2_utils.check_image_size({k: v for k, v in item.items() if v is not None}, image)
    return image


def _write_image_outputs(output_dir, name, item, image, image_format, instances,
                         score_threshold, to_dataset, class_names, metadata, binary_masks,
                         overlays) -> None:
    scores = instances.scores.numpy()
    keep = score_order(scores)
    keep = keep[scores[keep] >= score_threshold]
    shown = instances[torch.as_tensor(keep, dtype=torch.long)]
    height, width = image.shape[:2]
    has_masks = shown.has("pred_masks")
    masks = shown.pred_masks.numpy().astype(bool) if has_masks else \
        np.zeros((len(shown), height, width), dtype=bool)

    # Per-image files are atomic but not fsynced (two syncs per small file add up); the
    # results JSON, images.json and summary.json are fsynced.
    write_image(os.path.join(output_dir, "instance_maps", name + ".png"), instance_id_map(masks),
                durable=False)
    boxes = shown.pred_boxes.tensor.numpy()
    listed = []
    for k in range(len(shown)):
        cls = int(shown.pred_classes[k])
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        listed.append({
            "id": k + 1,
            "category_id": to_dataset[cls] if to_dataset is not None else cls,
            "category": class_names[cls] if class_names and cls < len(class_names) else None,
            "score": float(shown.scores[k]),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
        })
    atomic_write_json(os.path.join(output_dir, "instance_maps", name + ".json"), {
        "image_id": item["image_id"], "file_name": item["file_name"], "height": height,
        "width": width, "has_masks": has_masks, "instances": listed}, durable=False)

    if binary_masks:
        for k in range(len(shown)):
            write_image(os.path.join(output_dir, "instance_masks", name, f"{k + 1}.png"),
                        masks[k].astype(np.uint8) * 255, durable=False)
    if overlays:
        from detectron2.utils.visualizer import ColorMode, Visualizer

        rgb = d2_utils.convert_image_to_rgb(image, image_format)
        drawn = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE) \
            .draw_instance_predictions(shown).get_image()
        write_image(os.path.join(output_dir, "overlays", name + ".jpg"),
                    np.ascontiguousarray(drawn[:, :, ::-1]), durable=False)
