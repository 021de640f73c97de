"""
Checks of Detectron2 dataset records (``list[dict]`` in Detectron2's standard format).

A record that would crash a run midway (missing, unreadable or truncated image, an image
whose size is not the record's or above ``INPUT.MAX_IMAGE_PIXELS``) or train on garbage
(degenerate or non-finite box, box outside the image, degenerate polygon, category outside
the dataset's classes) is reported as an ``InvalidRecord`` naming its file, image id and
annotation. What to do with them (skip or refuse) is the caller's policy: see
``fpn_plugin.data.build`` and ``DATALOADER.INVALID_RECORDS``.

Pure Python/numpy apart from reading image headers with PIL; no Detectron2 state is touched.
"""
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.structures import BoxMode

from .images import (DEFAULT_MAX_IMAGE_PIXELS, ImageFileError, check_image_complete,
                     open_image_header)

__all__ = ["InvalidRecord", "check_record_annotations", "check_image_file", "validate_records",
           "format_invalid_records"]

@dataclass
class InvalidRecord:
    """
    One problem found in one record (several per record are possible), or a record left out
    for another stated reason (``kind``).

    Attributes:
        dataset (str): dataset name.
        file_name (str): the image file ("?" when unknown).
        image_id: the record's image id (None for an annotation without an image).
        annotation (int or None): index in the record's "annotations"; None: the image itself.
        reason (str): what is wrong.
        annotation_id: the dataset's own annotation id, where known (COCO JSON files).
        kind (str): "invalid" (a problem; ``DATALOADER.INVALID_RECORDS`` decides) or
            "no_annotations" (left out of training by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``;
            listed so that no record disappears unreported).
    """

    dataset: str
    file_name: str
    image_id: object
    annotation: Optional[int]
    reason: str
    annotation_id: Optional[object] = None
    kind: str = "invalid"

    def __str__(self):
        where = f"{self.file_name} (dataset {self.dataset}, image_id={self.image_id}"
        if self.annotation is not None:
            where += f", annotation #{self.annotation}"
        if self.annotation_id is not None:
            where += f", annotation id {self.annotation_id}"
        return f"{where}): {self.reason}"

    def to_dict(self) -> Dict:
        return asdict(self)


def _finite(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _polygon_area(poly: Sequence[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    n = len(xs)
    return 0.5 * abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n)))


def _check_segmentation(segm, height, width) -> Optional[str]:
    if isinstance(segm, dict):  # RLE
        size = segm.get("size")
        if "counts" not in segm or size is None or len(size) != 2:
            return f"malformed RLE segmentation (keys {sorted(segm)})"
        if height is not None and width is not None and list(size) != [height, width]:
            return f"RLE size {list(size)} differs from the image size {[height, width]}"
        return None
    if not isinstance(segm, (list, tuple)) or len(segm) == 0:
        return f"segmentation is neither polygons nor RLE: {type(segm).__name__}"
    for k, poly in enumerate(segm):
        if not isinstance(poly, (list, tuple)):
            return f"polygon {k} is not a list of coordinates"
        if len(poly) < 6 or len(poly) % 2:
            return f"degenerate polygon {k}: {len(poly)} coordinates (need an even number >= 6)"
        if not _finite(poly):
            return f"polygon {k} has non-finite coordinates"
        if _polygon_area(poly) <= 0.0:
            return f"degenerate polygon {k}: zero area"
    return None


def check_record_annotations(record: Dict, num_classes: int,
                             require_segmentation: bool = False) -> List[Tuple[Optional[int], str]]:
    """
    Check a record's annotations (not its image file).

    Args:
        record (dict): Detectron2 dataset dict with ``annotations`` (may be absent: no objects).
        num_classes (int): valid ``category_id`` are ``0 .. num_classes-1`` (contiguous ids,
            as Detectron2's loaders produce).
        require_segmentation (bool): an annotation without ``segmentation`` is a problem (a
            mask model cannot train on it).

    Returns:
        list of (annotation index or None, reason); empty when the record is fine.
    """
    problems = []
    height, width = record.get("height"), record.get("width")
    annotations = record.get("annotations", [])
    if not isinstance(annotations, (list, tuple)):
        return [(None, f"'annotations' is a {type(annotations).__name__}, not a list")]
    for i, anno in enumerate(annotations):
        cat = anno.get("category_id")
        if isinstance(cat, bool) or not isinstance(cat, int) or not 0 <= cat < num_classes:
            problems.append((i, f"category_id {cat!r} outside the dataset's {num_classes} classes"))
        box = anno.get("bbox")
        if box is None or len(box) != 4 or not _finite(box):
            problems.append((i, f"missing or non-finite bbox {box!r}"))
        else:
            try:
                x0, y0, x1, y1 = BoxMode.convert(list(map(float, box)), anno.get("bbox_mode"),
                                                 BoxMode.XYXY_ABS)
            except Exception as e:  # an unknown bbox_mode
                problems.append((i, f"bbox {box!r} with unusable bbox_mode: {e}"))
            else:
                if x1 <= x0 or y1 <= y0:
                    problems.append((i, f"degenerate bbox {list(box)} (zero or negative size)"))
                elif width is not None and height is not None and (
                        x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height):
                    problems.append((i, f"bbox {list(box)} lies outside the {width}x{height} image"))
        if "segmentation" in anno:
            reason = _check_segmentation(anno["segmentation"], height, width)
            if reason:
                problems.append((i, reason))
        elif require_segmentation and not anno.get("iscrowd", 0):
            problems.append((i, "no segmentation, but the model trains masks"))
    return problems


def check_image_file(record: Dict, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
    """
    Check that the record's image exists, its header decodes, it is not truncated (JPEG,
    PNG), has at most ``max_pixels`` pixels (0: no limit) and has the record's size.

    Returns:
        the reason it is unusable, or None.
    """
    path = record.get("file_name")
    try:
        width, height = open_image_header(path, max_pixels)
        check_image_complete(path)
    except ImageFileError as e:
        return str(e)
    except OSError as e:
        return f"image file {path!r} is unreadable ({type(e).__name__}: {e})"
    expected = (record.get("width"), record.get("height"))
    if None not in expected and (width, height) != tuple(expected):
        return f"image is {width}x{height} but the record says {expected[0]}x{expected[1]}"
    return None


def validate_records(records: Sequence[Dict], dataset: str, num_classes: int,
                     check_images: bool = True, check_annotations: bool = True,
                     require_segmentation: bool = False, num_threads: int = 8,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                     ) -> Tuple[List[Dict], List[InvalidRecord]]:
    """
    Split records into valid ones and problems.

    Args:
        records: Detectron2 dataset dicts of one dataset.
        dataset (str): its name, for the report.
        num_classes (int): number of classes of the dataset.
        check_images (bool): open each image file (header only; threads hide file latency).
        check_annotations (bool): check boxes, polygons and categories.
        require_segmentation (bool): see ``check_record_annotations``.
        num_threads (int): threads for the image checks.
        max_pixels (int): the pixel limit of the image check (``INPUT.MAX_IMAGE_PIXELS``).

    Returns:
        valid (list[dict]): the records without any problem, in their order.
        invalid (list[InvalidRecord]): every problem found; a record appears once per problem.
    """
    image_reasons = [None] * len(records)
    if check_images and records:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            image_reasons = list(pool.map(partial(check_image_file, max_pixels=max_pixels),
                                              records))
    valid, invalid = [], []
    for record, image_reason in zip(records, image_reasons):
        problems = [(None, image_reason)] if image_reason else []
        if check_annotations:
            problems += check_record_annotations(record, num_classes, require_segmentation)
        if problems:
            invalid += [InvalidRecord(dataset, str(record.get("file_name")),
                                      record.get("image_id"), idx, reason)
                        for idx, reason in problems]
        else:
            valid.append(record)
    return valid, invalid


def format_invalid_records(invalid: Sequence[InvalidRecord], limit: int = 20) -> str:
    """A readable multi-line report of the first ``limit`` problems and how many more."""
    lines = [f"  {p}" for p in invalid[:limit]]
    if len(invalid) > limit:
        lines.append(f"  ... and {len(invalid) - limit} more")
    return "\n".join(lines)
