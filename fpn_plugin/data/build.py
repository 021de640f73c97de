"""
Dataset loading with record validation before training (Detectron2 glue).

``get_validated_dataset_dicts`` loads datasets by name like Detectron2's
``get_detection_dataset_dicts`` and, before anything trains, checks every record
(``fpn_plugin.data.validation``). The policy ``DATALOADER.INVALID_RECORDS`` decides:

- ``"skip"``: a record with any problem is dropped whole (an image with one bad annotation
  would otherwise teach the model that the object is background); every problem is logged with
  its file and image id, and the caller gets the list (the trainer writes it to
  ``invalid_records.json`` and puts the count in the metrics).
- ``"error"``: a ``ValueError`` lists the problems and nothing trains.

COCO JSON files whose annotations use a category id missing from the file's ``categories``
make Detectron2's ``load_coco_json`` raise a bare ``KeyError``; that case is handled here
too: the offending annotations are reported by annotation id, and under ``"skip"`` the file is
re-loaded without their images.
"""
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import load_proposals_into_dataset, print_instances_class_histogram

from .config import INVALID_RECORD_POLICIES
from .validation import InvalidRecord, format_invalid_records, validate_records

__all__ = ["get_validated_dataset_dicts", "check_invalid_record_policy", "write_invalid_records"]

logger = logging.getLogger(__name__)


def check_invalid_record_policy(policy: str) -> str:
    """Return ``policy`` if it is a known ``DATALOADER.INVALID_RECORDS`` value, else raise."""
    if policy not in INVALID_RECORD_POLICIES:
        raise ValueError(
            f"DATALOADER.INVALID_RECORDS must be one of {INVALID_RECORD_POLICIES}, got {policy!r}")
    return policy


def _coco_unknown_category_records(name: str, json_file: str,
                                   image_root: str) -> Tuple[List[InvalidRecord], dict]:
    """Find annotations whose category is not in the COCO file's ``categories``."""
    with open(json_file) as f:
        data = json.load(f)
    known = {c["id"] for c in data.get("categories", [])}
    images = {im["id"]: im for im in data.get("images", [])}
    per_image_index: Dict[object, int] = {}
    invalid = []
    for anno in data.get("annotations", []):
        img_id = anno.get("image_id")
        idx = per_image_index.get(img_id, 0)
        per_image_index[img_id] = idx + 1
        if anno.get("category_id") not in known:
            file_name = os.path.join(image_root, images.get(img_id, {}).get("file_name", "?"))
            invalid.append(InvalidRecord(
                name, file_name, img_id, idx,
                f"category_id {anno.get('category_id')!r} (annotation id {anno.get('id')}) is "
                f"not among the categories of {json_file}"))
    return invalid, data


def _load_dataset(name: str, policy: str) -> Tuple[List[Dict], List[InvalidRecord]]:
    """``DatasetCatalog.get(name)``, surviving unknown COCO categories under "skip"."""
    try:
        return DatasetCatalog.get(name), []
    except KeyError as e:
        meta = MetadataCatalog.get(name)
        json_file = getattr(meta, "json_file", None)
        image_root = getattr(meta, "image_root", None)
        if name not in DatasetCatalog.list() or not json_file or "category_id" not in str(e):
            raise
        invalid, data = _coco_unknown_category_records(name, json_file, image_root)
        if not invalid:
            raise
    if policy == "error":
        raise ValueError(
            f"dataset {name!r}: {len(invalid)} invalid record(s) and "
            f"DATALOADER.INVALID_RECORDS='error':\n{format_invalid_records(invalid)}")
    from detectron2.data.datasets import load_coco_json

    bad_images = {p.image_id for p in invalid}
    data["images"] = [im for im in data["images"] if im["id"] not in bad_images]
    data["annotations"] = [a for a in data["annotations"] if a.get("image_id") not in bad_images]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(json_file))
        with open(path, "w") as f:
            json.dump(data, f)
        records = load_coco_json(path, image_root, name)
    return records, invalid


def get_validated_dataset_dicts(names: Sequence[str], *, policy: str = "skip",
                                num_classes: Optional[int] = None, check_images: bool = True,
                                check_annotations: bool = True, require_segmentation: bool = False,
                                filter_empty: bool = True, min_keypoints: int = 0,
                                proposal_files: Optional[Sequence[str]] = None
                                ) -> Tuple[List[Dict], List[InvalidRecord]]:
    """
    Load, validate and concatenate datasets (the validated twin of Detectron2's
    ``get_detection_dataset_dicts``).

    Args:
        names: registered dataset names.
        policy (str): "skip" or "error" (see module docstring).
        num_classes (int or None): class count to check categories against; None: each
            dataset's ``thing_classes`` (then required in its metadata).
        check_images (bool): open every image's header (see ``validation.check_image_file``).
        check_annotations (bool): check boxes, polygons, categories (off for inference sets,
            whose annotations the model never sees).
        require_segmentation (bool): annotations must carry masks (mask training).
        filter_empty (bool): drop images without non-crowd annotations (after validation).
        min_keypoints (int): drop images with fewer visible keypoints (0: keep all).
        proposal_files: precomputed proposals per dataset, or None.

    Returns:
        records (list[dict]): valid records of all datasets, in order.
        invalid (list[InvalidRecord]): problems found (empty under "error": it raises instead).
    """
    check_invalid_record_policy(policy)
    if isinstance(names, str):
        names = [names]
    if not len(names):
        raise ValueError("no dataset names given")
    all_records, all_invalid = [], []
    for i, name in enumerate(names):
        records, invalid = _load_dataset(name, policy)
        if not records and not invalid:
            raise ValueError(f"dataset {name!r} is empty")
        classes = num_classes
        if classes is None:
            thing_classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
            if thing_classes is None:
                raise ValueError(f"dataset {name!r} has no thing_classes in its metadata; "
                                 "pass num_classes")
            classes = len(thing_classes)
        valid, found = validate_records(records, name, classes, check_images=check_images,
                                        check_annotations=check_annotations,
                                        require_segmentation=require_segmentation)
        invalid = invalid + found
        if invalid:
            if policy == "error":
                raise ValueError(
                    f"dataset {name!r}: {len(invalid)} problem(s) in its records and "
                    f"DATALOADER.INVALID_RECORDS='error':\n{format_invalid_records(invalid)}")
            num_bad = len({(p.file_name, p.image_id) for p in invalid})
            logger.warning(
                f"dataset {name!r}: skipping {num_bad} of {num_bad + len(valid)} image records "
                f"with problems (DATALOADER.INVALID_RECORDS='skip'):\n"
                f"{format_invalid_records(invalid)}")
        if proposal_files is not None:
            valid = load_proposals_into_dataset(valid, proposal_files[i])
        all_records += valid
        all_invalid += invalid

    has_instances = bool(all_records) and "annotations" in all_records[0]
    if filter_empty and has_instances:
        before = len(all_records)
        all_records = [r for r in all_records
                       if any(not a.get("iscrowd", 0) for a in r["annotations"])]
        logger.info(f"Removed {before - len(all_records)} images without non-crowd annotations; "
                    f"{len(all_records)} left.")
    if min_keypoints > 0 and has_instances:
        all_records = [r for r in all_records if sum(
            sum(1 for v in a["keypoints"][2::3] if v > 0)
            for a in r["annotations"] if "keypoints" in a) >= min_keypoints]
    if has_instances:
        class_names = getattr(MetadataCatalog.get(names[0]), "thing_classes", None)
        if class_names is not None:
            print_instances_class_histogram(all_records, class_names)
    if not all_records:
        raise ValueError(f"no valid records left in {', '.join(names)}")
    return all_records, all_invalid


def write_invalid_records(invalid: Sequence[InvalidRecord], path: str) -> None:
    """Write the problems as a JSON list (one object per problem) to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump([p.to_dict() for p in invalid], f, indent=1, default=str)
