"""
Checks of a COCO instances JSON file as written, before Detectron2's loader reads it.

Detectron2's ``load_coco_json`` drops some annotations without saying which (polygons with
fewer than 3 points; an annotation left without a polygon), fails with a bare ``KeyError`` or
``AssertionError`` on others (a category id missing from ``categories``, duplicate annotation
ids, the ``ignore`` flag), and never sees annotations whose ``image_id`` is not among the
images. pycocotools, which scores COCO evaluation on the same file, fails on short polygons
too. :func:`scan_coco_json` reports all of these as :class:`InvalidRecord` (file, image id,
annotation index and annotation id), so callers can skip or refuse them before loading.

Pure Python (json only); no Detectron2 state is touched.
"""
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from ..io.coco import (ImagePathError, bbox_problem, image_entry_problem, read_coco_json,
                       resolve_image_path)
from .validation import InvalidRecord

__all__ = ["CocoJsonScan", "scan_coco_json", "without_images"]


@dataclass
class CocoJsonScan:
    """
    What :func:`scan_coco_json` found.

    Attributes:
        data (dict): the parsed JSON.
        problems (list[InvalidRecord]): one per problem; ``image_id`` is the COCO image id
            (None for an annotation whose image does not exist).
        annotation_ids (dict): image id -> the ids of its annotations in file order (the order
            ``load_coco_json`` keeps them in), to name annotations found bad after loading.
    """

    data: dict
    problems: List[InvalidRecord] = field(default_factory=list)
    annotation_ids: Dict[object, List[object]] = field(default_factory=dict)

    @property
    def bad_image_ids(self) -> Set[object]:
        return {p.image_id for p in self.problems if p.image_id is not None}


def _is_id(value) -> bool:
    """An id Detectron2 can hash and pycocotools can sort: an integer or a string."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _finite_numbers(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _segmentation_problem(segm) -> Optional[str]:
    """Why Detectron2 or pycocotools would drop or choke on ``segm``, or None."""
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return f"RLE segmentation without 'counts' and 'size' (keys {sorted(segm)})"
        return None
    if not isinstance(segm, list):
        return f"segmentation is a {type(segm).__name__}, neither polygons nor RLE"
    for k, poly in enumerate(segm):
        if not isinstance(poly, list) or not _finite_numbers(poly):
            return f"polygon {k} is not a list of finite numbers"
        if len(poly) < 6 or len(poly) % 2:
            return (f"polygon {k} has {len(poly)} coordinates (a polygon needs an even number, "
                    "at least 3 points); Detectron2's loader would drop it without a word")
    return None


def scan_coco_json(json_file: str, image_root: str, dataset: str,
                   allow_outside_root: bool = False) -> CocoJsonScan:
    """
    Check a COCO instances file for what Detectron2's loader or pycocotools would drop
    silently or fail on.

    Args:
        json_file (str): the COCO JSON.
        image_root (str): its image folder (for the file names in the report).
        dataset (str): dataset name, for the report.
        allow_outside_root (bool): accept image file names that are absolute or climb out of
            ``image_root`` with ``..`` (the dataset's metadata ``images_outside_root``).

    Returns:
        CocoJsonScan: the parsed data and the problems.

    Raises:
        CocoSchemaError (a ValueError): the file is missing, not JSON, or not shaped like a
            COCO file (``fpn_plugin.io.read_coco_json``).
    """
    data = read_coco_json(json_file)
    scan = CocoJsonScan(data)
    where = f"in {json_file}"

    def report(image, index, anno_id, reason):
        file_name = os.path.join(image_root, str(image.get("file_name", "?"))) if image else "?"
        scan.problems.append(InvalidRecord(dataset, file_name, image.get("id") if image else None,
                                           index, f"{reason} ({where})", annotation_id=anno_id))

    images: Dict[object, dict] = {}
    for i, image in enumerate(data.get("images", [])):
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            scan.problems.append(InvalidRecord(dataset, "?", None, None,
                                               f"images[{i}] has no integer or string 'id' "
                                               f"({where})"))
            continue
        if images and type(image["id"]) is not type(next(iter(images))):
            report(image, None, None, f"image id {image['id']!r} is a {type(image['id']).__name__}"
                                      " while the first image's is not (pycocotools sorts ids)")
            continue
        if image["id"] in images:
            report(image, None, None, f"image id {image['id']!r} appears twice; COCO tools "
                                      "would keep only the last entry")
            continue
        images[image["id"]] = image
        for reason in _image_problems(image, image_root, allow_outside_root):
            report(image, None, None, reason)
    categories = {c.get("id") for c in data.get("categories", []) if isinstance(c, dict)}

    seen_ids: Set[object] = set()
    for position, anno in enumerate(data.get("annotations", [])):
        if not isinstance(anno, dict):
            scan.problems.append(InvalidRecord(
                dataset, "?", None, None, f"annotations[{position}] is not an object ({where})"))
            continue
        anno_id = anno.get("id")
        image = images.get(anno.get("image_id")) if _is_id(anno.get("image_id")) else None
        ids = scan.annotation_ids.setdefault(anno.get("image_id"), []) if image else None
        index = len(ids) if ids is not None else None
        if ids is not None:
            ids.append(anno_id)
        if image is None:
            report(None, None, anno_id, f"annotation id {anno_id!r} refers to image_id "
                                        f"{anno.get('image_id')!r}, which is not among the images")
            continue
        if not _is_id(anno_id):
            report(image, index, None, f"annotation id {anno_id!r:.40} is neither an integer "
                                       "nor a string")
            anno_id = None
        elif anno_id in seen_ids:
            report(image, index, anno_id, f"annotation id {anno_id!r} is not unique")
        seen_ids.add(anno_id)
        for reason in _annotation_problems(anno, anno_id, categories):
            report(image, index, anno_id, reason)
    return scan


def _image_problems(image: dict, image_root: str, allow_outside_root: bool) -> List[str]:
    problems = []
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        problems.append("image entry without 'file_name'")
    else:
        try:
            resolve_image_path(image_root, image["file_name"], allow_outside_root)
        except ImagePathError as e:
            problems.append(str(e))
    reason = image_entry_problem(image)
    return problems + ([reason] if reason else [])


def _annotation_problems(anno: dict, anno_id, categories: Set[object]) -> List[str]:
    problems = []
    if not _is_id(anno.get("category_id")) or anno["category_id"] not in categories:
        problems.append(f"category_id {anno.get('category_id')!r} (annotation id {anno_id}) is "
                        "not among the categories")
    if anno.get("ignore", 0):
        problems.append("the 'ignore' flag is set, which Detectron2 does not support")
    for reason in (bbox_problem(anno["bbox"]) if "bbox" in anno else None,
                   _segmentation_problem(anno["segmentation"]) if "segmentation" in anno
                   else None):
        if reason:
            problems.append(reason)
    return problems


def without_images(data: dict, image_ids: Set[object]) -> dict:
    """A copy of COCO ``data`` without the given images, their annotations, and annotations
    of images that do not exist. (An image id that appears twice is among the problems the
    scan reports, so both of its entries go.)"""
    kept = [im for im in data.get("images", [])
            if isinstance(im, dict) and _is_id(im.get("id")) and im["id"] not in image_ids]
    kept_ids = {im["id"] for im in kept}
    out = dict(data)
    out["images"] = kept
    out["annotations"] = [a for a in data.get("annotations", [])
                          if isinstance(a, dict) and _is_id(a.get("image_id"))
                          and a["image_id"] in kept_ids]
    return out
