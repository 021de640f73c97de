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
    instance_maps/<name>.json     image_id, file_name, name and those instances: id,
                                  category_id, category, score, bbox (XYWH)
    instance_masks/<name>/<k>.png one 0/255 PNG per instance k (only with binary_masks=True)
    overlays/<name>.jpg           the image with those instances drawn (overlays=True)
    summary.json                  counts, skipped images with reasons, renamed images, timings,
                                  metrics

``<name>`` is made from the image's file name (or id) by ``fpn_plugin.utils.files``: letters,
digits, ``._-`` only, unique within the export. Whatever a dataset's ids and file names hold
(``../../x``, separators, duplicates), every file lands inside ``output_dir``; images.json, the
per-image JSON and summary.json ("renamed") map each name back to its image id.

Every file is written to a temporary name and renamed when complete, so an interrupted
export never leaves a truncated file that looks complete (the results JSON of a previous
complete run stays as it was). Temporary files a killed export (SIGKILL) left behind are
removed by the next export into the same folder; a lock file keeps two exports from writing
into one folder at once. The JSON files are also fsynced; the many small per-image files are
not (a power loss, unlike a crash of the process, may lose the last few of them).

The steps: :func:`plan_export` checks everything that can be checked before the model is built
(:class:`ExportPlan`); :class:`fpn_plugin.inference.predictor.Predictor` runs the model;
:class:`ImageOutputWriter` writes one :class:`ImageResult`'s files.
"""
import logging
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils

from ..config import with_plugin_defaults
from ..data.build import InvalidRecordsError, load_dataset_records
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, check_max_image_pixels, read_image_checked
from ..data.shapes import SHAPE_CLASSES, SHAPES_DATASET_NAMES
from ..data.validation import format_invalid_records
from ..evaluation.coco import check_dataset_registered
from ..inference.predictor import Predictor, check_weights
from ..utils.env import check_cuda_available
from ..utils.files import remove_stale_temp_files, unique_file_stem
from ..io.output import OutputFolder
from ..utils.paths import IMAGE_EXTENSIONS, check_output_dir, list_folder_images
from .coco_results import contiguous_to_dataset_ids, instances_to_coco_results
from .masks import instance_id_map, score_order
from .progress import ProgressLogger
from .writers import StreamingJSONArrayWriter, atomic_write_json, write_image

try:
    import fcntl
except ImportError:  # not POSIX: exports into one folder are then not kept apart
    fcntl = None

__all__ = ["IMAGE_EXTENSIONS", "RESULTS_FILE", "ExportOptions", "ExportPlan", "ImageOutputWriter",
           "ImageResult", "check_output_dir", "export_masks", "list_folder_images", "plan_export"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".export.lock"
# Sub-folders the export writes into (where stale temporary files are looked for).
_SUBFOLDERS = ("instance_maps", "overlays", "instance_masks", "coco_eval")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ExportOptions:
    """
    What to write, validated once (each error names the argument and its CLI option).

    Attributes:
        score_threshold (float): in [0, 1]; minimum score of the instances drawn in the id
            PNGs, binary masks and overlays (the results JSON keeps every detection).
        binary_masks (bool): also one 0/255 PNG per instance.
        overlays (bool): a JPEG of the masks drawn on the image.
        max_images (int or None): export only the first N (>= 1) images.
        progress_period_s (float): seconds (>= 0) between progress lines.
        max_image_pixels (int): images declaring more pixels are skipped unread (0: no limit).
    """

    score_threshold: float = 0.5
    binary_masks: bool = False
    overlays: bool = True
    max_images: Optional[int] = None
    progress_period_s: float = 10.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        t = self.score_threshold
        if not _is_number(t) or not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"score_threshold (--score-threshold) must be a number in [0, 1], "
                             f"got {t!r}")
        n = self.max_images
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"max_images (--max-images) must be an integer >= 1, got {n!r}")
        p = self.progress_period_s
        if not _is_number(p) or not math.isfinite(p) or p < 0:
            raise ValueError(f"progress_period_s (--progress-period) must be a number >= 0, "
                             f"got {p!r}")
        check_max_image_pixels(self.max_image_pixels)


@dataclass
class ExportItem:
    """One image to export; ``name`` is the safe, unique stem of its per-image files."""

    image_id: Any
    file_name: str
    height: Optional[int]
    width: Optional[int]
    name: str = ""


@dataclass
class ExportPlan:
    """Everything :func:`plan_export` checked before the model is built."""

    weights: str
    items: List[ExportItem]
    output_dir: str
    dataset: Optional[str]
    image_dir: Optional[str]
    metadata: Any = None  # Detectron2 Metadata naming the classes, or None
    to_dataset: Optional[Dict[int, int]] = None  # model class -> dataset category id
    class_names: Optional[Sequence[str]] = None
    renamed: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class ImageResult:
    """One image's prediction, ready to be written."""

    item: ExportItem
    image: np.ndarray  # (H, W, C) uint8 in cfg.INPUT.FORMAT
    instances: Any  # detectron2 Instances on CPU, at the image's size


def _dataset_items(dataset: str) -> List[ExportItem]:
    check_dataset_registered(dataset)
    loaded = load_dataset_records(dataset)
    if loaded.problems:
        raise InvalidRecordsError(
            f"dataset {dataset!r}: {len(loaded.problems)} problem(s) in its annotation file; "
            "fix them (or export the images with --images):\n"
            + format_invalid_records(loaded.problems), loaded.problems)
    # Detectron2 dataset dicts: small per image (paths, sizes, annotations), not pixels.
    return [ExportItem(r.get("image_id", i), r["file_name"], r.get("height"), r.get("width"))
            for i, r in enumerate(loaded.records)]


def _name_items(items: List[ExportItem]) -> List[Dict[str, Any]]:
    """Give each item a safe unique ``name``; return those that differ from their file stem."""
    used: set = set()
    renamed = []
    for item in items:
        stem = os.path.splitext(os.path.basename(str(item.file_name)))[0]
        item.name = unique_file_stem(stem or item.image_id, used, fallback="image")
        if item.name != stem:
            renamed.append({"image_id": item.image_id, "file_name": item.file_name,
                            "name": item.name})
    return renamed


def _static_shapes_metadata():
    """Class names and ids of the embedded shapes dataset, without generating it."""
    from detectron2.data.catalog import Metadata

    return Metadata(name="shapes", thing_classes=list(SHAPE_CLASSES),
                    thing_dataset_id_to_contiguous_id={i + 1: i
                                                       for i in range(len(SHAPE_CLASSES))})


def _metadata_for(cfg, dataset: Optional[str], metadata_name: Optional[str]):
    """The metadata naming the classes: the dataset's, else ``metadata_name``'s, else
    ``DATASETS.TEST[0]``'s (a COCO dataset registered but not loaded yet is loaded for it)."""
    if dataset is not None:
        return MetadataCatalog.get(metadata_name or dataset)
    name = metadata_name or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
    if name is None:
        return None
    if name not in DatasetCatalog.list():
        if name in SHAPES_DATASET_NAMES:
            return _static_shapes_metadata()
        logger.warning("%r (DATASETS.TEST[0]) is not registered: category ids are the model's "
                       "contiguous ids, classes unnamed", name)
        return None
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_classes"):
        # COCO-JSON datasets get their class names and id mapping only when loaded.
        try:
            DatasetCatalog.get(name)
        except Exception as e:  # e.g. its files are not on this machine
            logger.warning("class names of %r unavailable (%s: %s); writing contiguous ids",
                           name, type(e).__name__, e)
    return metadata


def plan_export(cfg, weights: Optional[str], *, output_dir: str, dataset: Optional[str],
                image_dir: Optional[str], options: ExportOptions,
                metadata_name: Optional[str] = None) -> ExportPlan:
    """
    Check everything cheap to check before the model is built, and list the images.

    Raises:
        ValueError, FileNotFoundError, CheckpointError: naming the argument, file or dataset.
    """
    if (dataset is None) == (image_dir is None):
        raise ValueError("pass exactly one of dataset= (a registered name) and image_dir=")
    weights = check_weights(weights or cfg.MODEL.WEIGHTS)
    check_cuda_available(cfg.MODEL.DEVICE)
    check_output_dir(output_dir)
    if dataset is not None:
        items = _dataset_items(dataset)
    else:
        items = [ExportItem(i + 1, f, None, None)
                 for i, f in enumerate(list_folder_images(image_dir))]
    if options.max_images is not None:
        items = items[:options.max_images]
    renamed = _name_items(items)

    metadata = _metadata_for(cfg, dataset, metadata_name)
    to_dataset = contiguous_to_dataset_ids(metadata)
    if to_dataset is not None and len(to_dataset) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but "
            f"{metadata.get('name', metadata_name)!r} has {len(to_dataset)} classes")
    class_names = metadata.get("thing_classes") if metadata is not None else None
    return ExportPlan(weights, items, output_dir, dataset, image_dir, metadata, to_dataset,
                      class_names, renamed)


class ImageOutputWriter:
    """
    Writes one image's files (id PNG, instance list, binary masks, overlay) under
    ``output_dir`` (layout in the module docstring).

    Per-image files are atomic but not fsynced (two syncs per small file add up); the results
    JSON, images.json and summary.json are fsynced.
    """

    def __init__(self, output_dir: str, options: ExportOptions, image_format: str, metadata=None,
                 to_dataset: Optional[Dict[int, int]] = None,
                 class_names: Optional[Sequence[str]] = None):
        self.output_dir = output_dir
        self.options = options
        self.image_format = image_format
        self.metadata = metadata
        self.to_dataset = to_dataset
        self.class_names = class_names
        # The writing boundary: no file outside output_dir, none through a symlinked
        # subfolder (checked here, before the model is built, and at every write).
        self._folder = OutputFolder(output_dir)
        self._written: List[str] = []  # recorded in the manifest when the export ends
        for sub in _SUBFOLDERS:
            self._folder.file(f"{sub}/_", create_folders=False)

    def _path(self, *parts: str) -> str:
        name = "/".join(parts)
        self._written.append(name)
        return self._folder.file(name)

    def path(self, name: str) -> str:
        """The checked path of a file of the export (e.g. ``results.json``), recorded as ours."""
        return self._path(name)

    def record_written(self) -> None:
        """Record every file this export wrote in the folder's manifest (one write for all)."""
        self._folder.record(*self._written)

    def shown_instances(self, result: ImageResult):
        """The instances drawn: score >= threshold, highest score first."""
        scores = result.instances.scores.numpy()
        keep = score_order(scores)
        keep = keep[scores[keep] >= self.options.score_threshold]
        return result.instances[torch.as_tensor(keep, dtype=torch.long)]

    def _listing(self, shown) -> List[Dict[str, Any]]:
        boxes = shown.pred_boxes.tensor.numpy()
        listed = []
        for k in range(len(shown)):
            cls = int(shown.pred_classes[k])
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
            names = self.class_names
            listed.append({
                "id": k + 1,
                "category_id": self.to_dataset[cls] if self.to_dataset is not None else cls,
                "category": names[cls] if names and cls < len(names) else None,
                "score": float(shown.scores[k]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            })
        return listed

    def write(self, result: ImageResult) -> None:
        shown = self.shown_instances(result)
        height, width = result.image.shape[:2]
        has_masks = shown.has("pred_masks")
        masks = shown.pred_masks.numpy().astype(bool) if has_masks else \
            np.zeros((len(shown), height, width), dtype=bool)
        name = result.item.name
        write_image(self._path("instance_maps", name + ".png"), instance_id_map(masks),
                    durable=False)
        atomic_write_json(self._path("instance_maps", name + ".json"), {
            "image_id": result.item.image_id, "file_name": result.item.file_name, "name": name,
            "height": height, "width": width, "has_masks": has_masks,
            "instances": self._listing(shown)}, durable=False)
        if self.options.binary_masks:
            for k in range(len(shown)):
                write_image(self._path("instance_masks", name, f"{k + 1}.png"),
                            masks[k].astype(np.uint8) * 255, durable=False)
        if self.options.overlays:
            self._write_overlay(name, result.image, shown)

    def _write_overlay(self, name: str, image: np.ndarray, shown) -> None:
        from detectron2.data.catalog import Metadata
        from detectron2.utils.visualizer import ColorMode, Visualizer

        rgb = d2_utils.convert_image_to_rgb(image, self.image_format)
        # Never None: Visualizer would then register "__nonexist__" in the global catalog.
        metadata = self.metadata if self.metadata is not None else Metadata(name="export")
        drawn = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE) \
            .draw_instance_predictions(shown).get_image()
        write_image(self._path("overlays", name + ".jpg"),
                    np.ascontiguousarray(drawn[:, :, ::-1]), durable=False)


@contextmanager
def _exclusive_output_folder(output_dir: str) -> Iterator[None]:
    """Hold the folder's lock file; remove temporary files a killed export left there."""
    with open(os.path.join(output_dir, LOCK_FILE), "a") as lock:
        try:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"another export is writing to {output_dir!r} (it holds "
                             f"{LOCK_FILE}); wait for it or pick another --output") from None
        folders = [output_dir] + [os.path.join(output_dir, d) for d in _SUBFOLDERS]
        removed = [p for i, folder in enumerate(folders)
                   for p in remove_stale_temp_files(folder, recursive=i > 0)]
        if removed:
            logger.info("removed %d partial file(s) left by an interrupted export in %s",
                        len(removed), output_dir)
        yield  # closing the file releases the lock


def _finite_or_none(obj):
    """Metrics may hold NaN, which strict JSON cannot carry: write null instead."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _evaluate(evaluator, summary: Dict[str, Any]) -> Optional[str]:
    """Run the evaluator into ``summary``; return the error message if it failed."""
    try:
        summary["metrics"] = _finite_or_none(dict(evaluator.evaluate() or {}))
        return None
    except Exception as e:  # the export itself is complete; say so and keep its summary
        summary["metrics"] = None
        summary["evaluation_error"] = f"{type(e).__name__}: {e}"
        return summary["evaluation_error"]


def export_masks(cfg, weights: Optional[str] = None, *, output_dir: str,
                 dataset: Optional[str] = None, image_dir: Optional[str] = None,
                 score_threshold: float = 0.5, binary_masks: bool = False,
                 overlays: bool = True, evaluator=None, metadata_name: Optional[str] = None,
                 max_images: Optional[int] = None,
                 progress_period_s: float = 10.0) -> Dict[str, Any]:
    """
    Run inference and export masks (see the module docstring for the files written).

    Args:
        cfg (CfgNode): the model's config (the plugin's keys get their defaults if absent).
            MODEL.DEVICE is where inference runs; INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST the resize;
            INPUT.MAX_IMAGE_PIXELS the largest image decoded.
        weights (str): checkpoint file; None uses MODEL.WEIGHTS. Loaded without running code
            from the file, and strictly: keys or shapes that differ from the model are an error.
        output_dir (str): created if missing; existing files of the same names are replaced.
        dataset (str): a name registered in DatasetCatalog; its image ids and its category ids
            (``thing_dataset_id_to_contiguous_id``) are written, so the results JSON evaluates
            against its annotations. A COCO annotation file with problems (see
            ``fpn_plugin.data.coco_json``) is refused before the model is built. Exclusive
            with ``image_dir``.
        image_dir (str): a folder of images (not recursive); image ids are 1, 2, ... in name
            order. Category ids and class names are those of ``metadata_name``'s dataset (by
            default ``cfg.DATASETS.TEST[0]``) if it has a mapping, else the model's
            contiguous ids.
        score_threshold (float): in [0, 1]; minimum score of the instances drawn in the id
            PNGs, binary masks and overlays. The results JSON keeps every detection (AP needs
            them).
        binary_masks (bool): also write one 0/255 PNG per instance.
        overlays (bool): write a JPEG of the masks drawn on the image.
        evaluator (DatasetEvaluator): optional, e.g. ``build_coco_evaluator(dataset, dir)``; fed
            the same predictions, its ``evaluate()`` result goes to the summary ("metrics").
            COCOEvaluator keeps all predictions in memory; for very large datasets evaluate the
            written JSON with ``fpn_plugin.evaluation.evaluate_coco_results_json`` instead.
        metadata_name (str): dataset whose metadata names the classes; default ``dataset``,
            else cfg.DATASETS.TEST[0].
        max_images (int): export only the first N (>= 1) images (quick checks).
        progress_period_s (float): seconds between progress lines (with ETA).

    Returns:
        dict: the summary also written to ``summary.json`` (num_images, num_exported,
        num_detections, skipped: [{image_id, file_name, error}], renamed: [{image_id,
        file_name, name}], results_json, seconds, metrics).

    Raises:
        ValueError: bad arguments, unregistered dataset or one with a bad annotation file,
            empty folder, class-count mismatch, unusable output folder, no image could be
            read, or a failed evaluation (summary.json is written first).
        FileNotFoundError: ``image_dir`` does not exist.
        CheckpointError / CheckpointMismatchError: missing, corrupt or mismatched weights.
    """
    cfg = with_plugin_defaults(cfg)
    options = ExportOptions(score_threshold, binary_masks, overlays, max_images,
                            progress_period_s, cfg.INPUT.MAX_IMAGE_PIXELS)
    if evaluator is not None and dataset is None:
        raise ValueError("evaluator= needs dataset= (a folder of images has no annotations)")
    plan = plan_export(cfg, weights, output_dir=output_dir, dataset=dataset,
                       image_dir=image_dir, options=options, metadata_name=metadata_name)
    writer = ImageOutputWriter(output_dir, options, cfg.INPUT.FORMAT, plan.metadata,
                               plan.to_dataset, plan.class_names)
    with _exclusive_output_folder(output_dir):
        predictor = Predictor(cfg, plan.weights)
        return _run(plan, predictor, writer, evaluator, options, cfg.INPUT.FORMAT)


def _run(plan: ExportPlan, predictor: Predictor, writer: ImageOutputWriter, evaluator,
         options: ExportOptions, image_format: str) -> Dict[str, Any]:
    """Predict and write every image of the plan, then the summary (and evaluation)."""
    source = f"dataset {plan.dataset!r}" if plan.dataset else repr(plan.image_dir)
    logger.info("exporting %d images from %s to %s", len(plan.items), source, plan.output_dir)
    if evaluator is not None:
        evaluator.reset()
    start = time.perf_counter()
    skipped, num_detections = _export_images(plan, predictor, writer, evaluator, options,
                                             image_format)
    summary = _summary(plan, skipped, num_detections, time.perf_counter() - start)
    evaluation_error = _evaluate(evaluator, summary) if evaluator is not None else None
    atomic_write_json(writer.path(SUMMARY_FILE), summary, indent=2, default=str)
    writer.record_written()
    logger.info("exported %d/%d images (%d detections) in %.1f s; skipped %d",
                summary["num_exported"], len(plan.items), num_detections, summary["seconds"],
                len(skipped))
    for s in skipped:
        logger.warning("skipped %s: %s", s["file_name"], s["error"])
    if evaluation_error:
        raise ValueError(f"the export is complete ({summary['results_json']}, summary.json), "
                         f"but evaluation failed: {evaluation_error}")
    return summary


def _export_images(plan: ExportPlan, predictor: Predictor, writer: ImageOutputWriter, evaluator,
                   options: ExportOptions, image_format: str):
    """
    The image loop: read (unreadable images are listed and skipped), predict, stream the
    results JSON and images.json, write the per-image files, feed the evaluator.

    Returns:
        (skipped records, number of detections).
    """
    items = plan.items
    skipped: List[Dict[str, Any]] = []
    num_detections = 0
    progress = ProgressLogger(len(items), "export", logger, period_s=options.progress_period_s)
    with ExitStack() as stack:
        results = stack.enter_context(
            StreamingJSONArrayWriter(writer.path(RESULTS_FILE)))
        images = stack.enter_context(
            StreamingJSONArrayWriter(writer.path(IMAGES_FILE)))
        for item in items:
            try:
                image = _read_checked(item, image_format, options.max_image_pixels)
            except Exception as e:  # any unreadable input is reported and skipped
                reason = f"{type(e).__name__}: {e}"
                logger.warning("skipping %s: %s", item.file_name, reason)
                skipped.append({"image_id": item.image_id, "file_name": item.file_name,
                                "error": reason})
                progress.update()
                continue
            height, width = image.shape[:2]
            inputs = {"image_id": item.image_id, "file_name": item.file_name,
                      "height": height, "width": width}
            outputs = predictor(image, inputs)
            instances = outputs["instances"].to("cpu")
            for record in instances_to_coco_results(instances, item.image_id, plan.to_dataset):
                results.write(record)
                num_detections += 1
            if evaluator is not None:
                evaluator.process([inputs], [outputs])
            images.write({"id": item.image_id, "name": item.name, "file_name": item.file_name,
                          "height": height, "width": width})
            writer.write(ImageResult(item, image, instances))
            progress.update()
        if len(skipped) == len(items):
            raise ValueError(f"none of the {len(items)} images could be read; first error: "
                             f"{skipped[0]['file_name']}: {skipped[0]['error']}")
        # Leaving the ExitStack commits images.json, then the results JSON.
    return skipped, num_detections


def _summary(plan: ExportPlan, skipped: List[Dict[str, Any]], num_detections: int,
             seconds: float) -> Dict[str, Any]:
    return {
        "dataset": plan.dataset,
        "image_dir": plan.image_dir,
        "weights": plan.weights,
        "num_images": len(plan.items),
        "num_exported": len(plan.items) - len(skipped),
        "num_detections": num_detections,
        "skipped": skipped,
        "renamed": plan.renamed,
        "results_json": os.path.join(plan.output_dir, RESULTS_FILE),
        "category_ids": "dataset" if plan.to_dataset is not None else "contiguous",
        "seconds": round(seconds, 3),
    }


def _read_checked(item: ExportItem, image_format: str, max_pixels: int) -> np.ndarray:
    """Read an image; a dataset's recorded size must match it (as Detectron2's mapper checks)."""
    image = read_image_checked(item.file_name, image_format, max_pixels)
    recorded = {k: v for k, v in (("height", item.height), ("width", item.width)) if v is not None}
    d2_utils.check_image_size(dict(recorded, file_name=item.file_name), image)
    return image
