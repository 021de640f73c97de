"""
Checks of Detectron2 dataset records (``list[dict]`` in Detectron2's standard format).

A record that would crash a run midway (missing or unreadable image, an image whose size is
not the record's) or train on garbage (degenerate or non-finite box, box outside the image,
degenerate polygon, category outside the dataset's classes) is reported as an
``InvalidRecord`` naming its file, image id and annotation. What to do with them (skip or
refuse) is the caller's policy: see ``fpn_plugin.data.build`` and ``DATALOADER.INVALID_RECORDS``.

Pure Python/numpy apart from reading image headers with PIL; no Detectron2 state is touched.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.structures import BoxMode
from PIL import Image

__all__ = ["InvalidRecord", "check_record_annotations", "check_image_file", "validate_records",
           "format_invalid_records"]

# EXIF orientations that swap width and height (Detectron2 applies EXIF rotation on read).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass
class InvalidRecord:
    """One problem found in one record (several per record are possible)."""

    dataset: str
    file_name: str
    image_id: object
    annotation: Optional[int]  # index in record["annotations"]; None: the image itself
    reason: str

    def __str__(self):
        where = f"{self.file_name} (dataset {self.dataset}, image_id={self.image_id}"
        if self.annotation is not None:
            where += f", annotation #{self.annotation}"
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


def check_image_file(record: Dict) -> Optional[str]:
    """
    Check that the record's image exists, decodes (header) and has the record's size.

    Returns:
        the reason it is unusable, or None.
    """
    path = record.get("file_name")
    if not path or not os.path.isfile(path):
        return "image file is missing"
    try:
        with Image.open(path) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
            except Exception:  # broken EXIF: Detectron2 ignores it too
                orientation = None
    except Exception as e:  # PIL raises several types for corrupt files
        return f"image file is unreadable ({type(e).__name__}: {e})"
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    expected = (record.get("width"), record.get("height"))
    if None not in expected and (width, height) != tuple(expected):
        return f"image is {width}x{height} but the record says {expected[0]}x{expected[1]}"
    return None


def validate_records(records: Sequence[Dict], dataset: str, num_classes: int,
                     check_images: bool = True, check_annotations: bool = True,
                     require_segmentation: bool = False,
                     num_threads: int = 8) -> Tuple[List[Dict], List[InvalidRecord]]:
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

    Returns:
        valid (list[dict]): the records without any problem, in their order.
        invalid (list[InvalidRecord]): every problem found; a record appears once per problem.
    """
    image_reasons = [None] * len(records)
    if check_images and records:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            image_reasons = list(pool.map(check_image_file, records))
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
