"""
Dataset loading with record validation before training (Detectron2 glue).

``get_validated_dataset_dicts`` loads datasets by name like Detectron2's
``get_detection_dataset_dicts`` and, before anything trains, checks every record
(``fpn_plugin.data.validation``). ``validate_datasets(cfg)`` does it once for a training
run's ``DATASETS.TRAIN`` and ``DATASETS.TEST``. The policy ``DATALOADER.INVALID_RECORDS``
decides:

- ``"skip"``: a record with any problem is dropped whole (an image with one bad annotation
  would otherwise teach the model that the object is background); every problem is logged with
  its file and image id, and the caller gets the list (the trainer writes it to
  ``invalid_records.json`` and puts the count in the metrics).
- ``"error"``: an :class:`InvalidRecordsError` lists every problem found (in all datasets)
  and nothing trains.

COCO JSON files are first read as written (``fpn_plugin.data.coco_json``): what Detectron2's
``load_coco_json`` would drop silently (polygons with fewer than 3 points, annotations of
images that do not exist) or fail on (an unknown category id, duplicate annotation ids) is
reported by image and annotation id like any other problem, and the file is then loaded
without the affected images. Images that training leaves out because they have no usable
annotations (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) are listed too (kind
``"no_annotations"``), so no record disappears unreported.
"""
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import print_instances_class_histogram

from ..utils.files import atomic_write_json
from .coco_json import scan_coco_json, without_images
from .config import INVALID_RECORD_POLICIES
from .images import DEFAULT_MAX_IMAGE_PIXELS, check_max_image_pixels
from .proposals import load_proposals_into_records
from .validation import InvalidRecord, format_invalid_records, validate_records

__all__ = [
    "DatasetCheck",
    "InvalidRecordsError",
    "check_datasets",
    "check_invalid_record_policy",
    "get_validated_dataset_dicts",
    "load_dataset_records",
    "validate_datasets",
    "write_invalid_records",
]

logger = logging.getLogger(__name__)

# InvalidRecord.kind of problems in an evaluation set's ground-truth file: COCO evaluation
# reads that file as it is, so they cannot be skipped.
GROUND_TRUTH = "ground_truth"
NO_ANNOTATIONS = "no_annotations"


class InvalidRecordsError(ValueError):
    """
    Problems in dataset records that stop a run (policy ``"error"``, or an evaluation set's
    ground truth that COCO evaluation cannot read).

    Attributes:
        problems (list[InvalidRecord]): all of them.
    """

    def __init__(self, message: str, problems: Sequence[InvalidRecord]):
        super().__init__(message)
        self.problems = list(problems)


def check_invalid_record_policy(policy: str, key: str = "DATALOADER.INVALID_RECORDS") -> str:
    """Return ``policy`` if it is a known invalid-records policy, else raise naming ``key``
    (the setting's name in the caller's config: YAML by default)."""
    if policy not in INVALID_RECORD_POLICIES:
        raise ValueError(f"{key} must be one of {INVALID_RECORD_POLICIES}, got {policy!r}")
    return policy


@dataclass
class LoadedDataset:
    """A dataset's records as Detectron2 loads them, and what was found before loading."""

    records: List[Dict]
    problems: List[InvalidRecord] = field(default_factory=list)
    # image id -> its annotation ids in record order (COCO JSON files only)
    annotation_ids: Dict[object, List[object]] = field(default_factory=dict)


def load_dataset_records(name: str) -> LoadedDataset:
    """
    ``DatasetCatalog.get(name)``, with COCO instance files (metadata ``json_file``,
    ``image_root`` and ``evaluator_type`` "coco", as ``register_coco_instances`` sets) checked
    as written first; when the check finds problems, the file is loaded without the affected
    images.

    Raises:
        ValueError: unregistered name, or an annotation file that is missing or not COCO JSON.
    """
    if name not in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is not registered in Detectron2's DatasetCatalog")
    meta = MetadataCatalog.get(name)
    json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
    # Only COCO instance files (register_coco_instances, Detectron2's builtin COCO sets): LVIS
    # and panoptic files have other fields and loaders.
    if not json_file or image_root is None or getattr(meta, "evaluator_type", None) != "coco":
        return LoadedDataset(DatasetCatalog.get(name))
    scan = scan_coco_json(json_file, image_root, name)
    if not scan.problems:
        return LoadedDataset(DatasetCatalog.get(name), [], scan.annotation_ids)
    from detectron2.data.datasets import load_coco_json

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(json_file))
        with open(path, "w") as f:
            json.dump(without_images(scan.data, scan.bad_image_ids), f)
        records = load_coco_json(path, image_root, name)
    return LoadedDataset(records, scan.problems, scan.annotation_ids)


def _name_annotations(problems: List[InvalidRecord], annotation_ids: Dict) -> None:
    """Add the file's annotation id to problems found by index after loading."""
    for p in problems:
        ids = annotation_ids.get(p.image_id)
        if p.annotation_id is None and p.annotation is not None and ids \
                and p.annotation < len(ids):
            p.annotation_id = ids[p.annotation]


def _num_classes_of(name: str, num_classes: Optional[int]) -> int:
    if num_classes is not None:
        return num_classes
    thing_classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
    if thing_classes is None:
        raise ValueError(f"dataset {name!r} has no thing_classes in its metadata; pass num_classes")
    return len(thing_classes)


def _raise_for_policy(problems: Sequence[InvalidRecord], policy: str, where: str,
                      report_path: Optional[str] = None) -> None:
    fatal = [p for p in problems
             if p.kind == GROUND_TRUTH or (policy == "error" and p.kind == "invalid")]
    if not fatal:
        return
    listed = f"; all of them are listed in {report_path}" if report_path else ""
    why = ("DATALOADER.INVALID_RECORDS='error'" if policy == "error" else
           "evaluation reads the ground-truth file as it is, so these cannot be skipped")
    raise InvalidRecordsError(
        f"{len(fatal)} problem(s) in the records of {where} ({why}){listed}:\n"
        f"{format_invalid_records(fatal)}", problems)


def _log_skipped(name: str, problems: Sequence[InvalidRecord], num_valid: int) -> None:
    invalid = [p for p in problems if p.kind == "invalid"]
    if not invalid:
        return
    num_bad = len({(p.file_name, p.image_id) for p in invalid})
    logger.warning(
        f"dataset {name!r}: skipping {num_bad} of {num_bad + num_valid} image records "
        f"with problems (DATALOADER.INVALID_RECORDS='skip'):\n{format_invalid_records(invalid)}")


def _filter_empty(name: str, records: List[Dict]) -> Tuple[List[Dict], List[InvalidRecord]]:
    """Records with a non-crowd annotation, and the others listed as ``no_annotations``."""
    kept, dropped = [], []
    for r in records:
        if any(not a.get("iscrowd", 0) for a in r.get("annotations", [])):
            kept.append(r)
        else:
            dropped.append(InvalidRecord(
                name, str(r.get("file_name")), r.get("image_id"), None,
                "no annotations to train on (none, or crowd only): left out of training "
                "(DATALOADER.FILTER_EMPTY_ANNOTATIONS)", kind=NO_ANNOTATIONS))
    if dropped:
        logger.warning(f"dataset {name!r}: {len(dropped)} image(s) have no annotations to train "
                       f"on and are left out (DATALOADER.FILTER_EMPTY_ANNOTATIONS); "
                       f"{len(kept)} left")
    return kept, dropped


def get_validated_dataset_dicts(names: Sequence[str], *, policy: str = "skip",
                                num_classes: Optional[int] = None, check_images: bool = True,
                                check_annotations: bool = True, require_segmentation: bool = False,
                                filter_empty: bool = True, min_keypoints: int = 0,
                                proposal_files: Optional[Sequence[str]] = None,
                                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                                ground_truth_problems_fatal: bool = False,
                                report_path: Optional[str] = None
                                ) -> Tuple[List[Dict], List[InvalidRecord]]:
    """
    Load, validate and concatenate datasets (the validated twin of Detectron2's
    ``get_detection_dataset_dicts``).

    Args:
        names: registered dataset names.
        policy (str): "skip" or "error" (see module docstring). Under "error" every problem
            of every dataset is collected before the error is raised.
        num_classes (int or None): class count to check categories against; None: each
            dataset's ``thing_classes`` (then required in its metadata).
        check_images (bool): open every image's header (see ``validation.check_image_file``).
        check_annotations (bool): check boxes, polygons, categories (off for inference sets,
            whose annotations the model never sees).
        require_segmentation (bool): annotations must carry masks (mask training).
        filter_empty (bool): drop images without non-crowd annotations (after validation);
            they are returned among the problems with kind "no_annotations".
        min_keypoints (int): drop images with fewer visible keypoints (0: keep all).
        proposal_files: precomputed proposals per dataset, or None.
        max_image_pixels (int): image pixel limit (``INPUT.MAX_IMAGE_PIXELS``; 0: none).
        ground_truth_problems_fatal (bool): problems found in a COCO JSON file as written
            stop the run under any policy (evaluation sets: COCO evaluation reads the file).
        report_path (str): where the caller writes the problems; named in the error message.

    Returns:
        records (list[dict]): valid records of all datasets, in order.
        problems (list[InvalidRecord]): every problem found, and the records filtered as empty.

    Raises:
        InvalidRecordsError: see ``policy`` and ``ground_truth_problems_fatal``.
        ValueError: no names, an unregistered or empty dataset, or no valid record left.
    """
    check_invalid_record_policy(policy)
    check_max_image_pixels(max_image_pixels)
    if isinstance(names, str):
        names = [names]
    if not len(names):
        raise ValueError("no dataset names given")
    per_dataset, all_problems = [], []
    for name in names:
        loaded = load_dataset_records(name)
        if not loaded.records and not loaded.problems:
            raise ValueError(f"dataset {name!r} is empty")
        if ground_truth_problems_fatal:
            for p in loaded.problems:
                p.kind = GROUND_TRUTH
        valid, found = validate_records(
            loaded.records, name, _num_classes_of(name, num_classes), check_images=check_images,
            check_annotations=check_annotations, require_segmentation=require_segmentation,
            max_pixels=max_image_pixels)
        _name_annotations(found, loaded.annotation_ids)
        problems = loaded.problems + found
        per_dataset.append((name, valid, problems))
        all_problems += problems
    _raise_for_policy(all_problems, policy, ", ".join(names), report_path)

    all_records = []
    for i, (name, valid, problems) in enumerate(per_dataset):
        _log_skipped(name, problems, len(valid))
        if proposal_files is not None:
            valid = load_proposals_into_records(valid, proposal_files[i])
        if filter_empty and valid and "annotations" in valid[0]:
            valid, dropped = _filter_empty(name, valid)
            all_problems += dropped
        all_records += valid
    has_instances = bool(all_records) and "annotations" in all_records[0]
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
    return all_records, all_problems


@dataclass
class DatasetCheck:
    """
    A training run's datasets, validated once before training (see :func:`validate_datasets`).

    Attributes:
        train_records (list[dict]): the valid records of ``DATASETS.TRAIN``.
        test_records (dict[str, list[dict]]): the valid records of each ``DATASETS.TEST`` set.
        problems (list[InvalidRecord]): every problem found, and the training records left
            out as empty (kind "no_annotations").
    """

    train_records: List[Dict]
    test_records: Dict[str, List[Dict]]
    problems: List[InvalidRecord]

    @property
    def num_skipped(self) -> int:
        """Image records skipped for problems (each counted once)."""
        return len({(p.dataset, p.file_name, p.image_id) for p in self.problems
                    if p.kind == "invalid"})


def validate_datasets(cfg, report_path: Optional[str] = None) -> DatasetCheck:
    """
    Validate ``DATASETS.TRAIN`` (annotations and images) and ``DATASETS.TEST`` (images, and
    the ground-truth file COCO evaluation will read) once, before training: the config's keys
    mapped onto :func:`check_datasets`.

    Raises:
        InvalidRecordsError: under ``DATALOADER.INVALID_RECORDS: error``, listing every problem
            of every dataset; under either policy, problems in an evaluation set's ground truth.
    """
    load_proposals = cfg.MODEL.LOAD_PROPOSALS
    return check_datasets(
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST,
        policy=check_invalid_record_policy(cfg.DATALOADER.INVALID_RECORDS),
        check_images=cfg.DATALOADER.CHECK_IMAGES,
        require_segmentation=cfg.MODEL.MASK_ON,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files_train=cfg.DATASETS.PROPOSAL_FILES_TRAIN if load_proposals else None,
        proposal_files_test=cfg.DATASETS.PROPOSAL_FILES_TEST if load_proposals else None,
        max_image_pixels=check_max_image_pixels(cfg.INPUT.MAX_IMAGE_PIXELS),
        report_path=report_path)


def check_datasets(train: Sequence[str], test: Sequence[str], *, policy: str = "skip",
                   check_images: bool = True, require_segmentation: bool = False,
                   filter_empty: bool = True, min_keypoints: int = 0,
                   proposal_files_train: Optional[Sequence[str]] = None,
                   proposal_files_test: Optional[Sequence[str]] = None,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   report_path: Optional[str] = None) -> DatasetCheck:
    """
    Validate a training run's datasets once, before training: the training sets' annotations
    and images, and the evaluation sets' images and the ground-truth files COCO evaluation
    will read. Every problem of every set is collected before the policy decides.

    Args:
        train, test: registered dataset names (either may be empty).
        policy, check_images, require_segmentation, filter_empty, min_keypoints,
            max_image_pixels: as :func:`get_validated_dataset_dicts` (training sets; the
            evaluation sets keep every image with annotations unchecked).
        proposal_files_train (list[str] or None): precomputed proposals of ``train``.
        proposal_files_test (list[str] or None): one file per ``test`` set.
        report_path (str): where the caller writes the problems; named in the error message.

    Raises:
        InvalidRecordsError: under policy "error", listing every problem of every dataset;
            under either policy, problems in an evaluation set's ground truth.
    """
    problems: List[InvalidRecord] = []
    train_records: List[Dict] = []
    test_records: Dict[str, List[Dict]] = {}
    if len(train):
        train_records, problems = get_validated_dataset_dicts(
            train, policy="skip", check_images=check_images,
            require_segmentation=require_segmentation, filter_empty=filter_empty,
            min_keypoints=min_keypoints, proposal_files=proposal_files_train,
            max_image_pixels=max_image_pixels)
    for i, name in enumerate(test):
        try:
            test_records[name], found = get_validated_dataset_dicts(
                [name], policy="skip", check_images=check_images,
                check_annotations=False, filter_empty=False,
                proposal_files=([proposal_files_test[i]] if proposal_files_test else None),
                max_image_pixels=max_image_pixels, ground_truth_problems_fatal=True)
        except InvalidRecordsError as e:  # raised below, with the other sets' problems
            found = e.problems
        problems += found
    names = dict.fromkeys(list(train) + list(test))
    _raise_for_policy(problems, policy, ", ".join(names), report_path)
    return DatasetCheck(train_records, test_records, problems)


def write_invalid_records(problems: Sequence[InvalidRecord], path: str) -> None:
    """Write the problems as a JSON list (one object per problem) to ``path``, atomically."""
    atomic_write_json(path, [p.to_dict() for p in problems], indent=1, default=str)
