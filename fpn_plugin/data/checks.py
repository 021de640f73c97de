"""
Config against data, processes, devices and the checkpoint being resumed, checked before a
training or evaluation run writes anything (each error names the config key, and the file or
dataset it disagrees with).

- :func:`check_before_setup` (called by ``fpn_plugin.engine.setup.default_setup``, before
  Detectron2's ``default_setup`` writes ``config.yaml``): ``OUTPUT_DIR`` not a file,
  ``SOLVER.CHECKPOINT_PERIOD`` > 0, ``SOLVER.IMS_PER_BATCH`` divisible by the number of
  processes, ``MODEL.DEVICE`` cuda only with CUDA, ``--resume`` only into a run of the same
  model (``MODEL.*`` against the previous ``OUTPUT_DIR/config.yaml``), ``--eval-only`` classes
  against the test sets; for a LazyConfig ``dataloader.train.total_batch_size`` > 0 and
  divisible by the processes, ``train.output_dir`` not a file.
- :func:`check_config_against_data` (called by ``validate_datasets`` once the records are
  loaded): ``MODEL.ROI_HEADS.NUM_CLASSES`` against the training sets' classes (smaller: an
  error, as training would fail at the first out-of-range label; larger: a warning) and
  ``INPUT.MASK_FORMAT`` against the kind of masks in the records.
"""
import logging
import os
from typing import Dict, List, Optional, Sequence

__all__ = ["check_before_setup", "check_config_against_data", "check_lazy_run_config",
           "check_resume_compatible", "check_run_config"]

logger = logging.getLogger(__name__)

# MODEL keys a resumed run may change: where the weights come from, and where it runs.
_RESUMABLE_CHANGES = ("MODEL.WEIGHTS", "MODEL.DEVICE")
# Differences named in a resume error (the rest are counted).
_NAMED = 5


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _world_size() -> int:
    from detectron2.utils import comm

    return comm.get_world_size()


def _check_output_dir(path, key: str) -> None:
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{key} {path!r} is an existing file, not a folder; choose another "
                         "output folder")


def check_run_config(cfg, num_processes: Optional[int] = None) -> None:
    """
    The run-level keys of a yacs config (see the module docstring).

    Raises:
        ValueError: naming the key.
    """
    num_processes = num_processes or _world_size()
    _check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    period = cfg.SOLVER.CHECKPOINT_PERIOD
    if not _is_int(period) or period <= 0:
        raise ValueError(f"SOLVER.CHECKPOINT_PERIOD must be an integer >= 1 (iterations between "
                         f"checkpoints), got {period!r}")
    batch = cfg.SOLVER.IMS_PER_BATCH
    if not _is_int(batch) or batch <= 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH must be an integer >= 1, got {batch!r}")
    if batch % num_processes:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {batch} is not divisible by the {num_processes} "
                         "processes (--num-gpus x --num-machines); each process takes an equal "
                         "share of the batch")
    _check_device(str(cfg.MODEL.DEVICE), "MODEL.DEVICE")


def _check_device(device: str, key: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{key}={device!r} but CUDA is not available on this machine: set "
                             f"{key} cpu")


def check_lazy_run_config(cfg, num_processes: Optional[int] = None) -> None:
    """
    The run-level keys of a LazyConfig: ``dataloader.train.total_batch_size`` (> 0, divisible
    by the processes) and ``train.output_dir`` (not a file).

    Raises:
        ValueError: naming the key.
    """
    from omegaconf import OmegaConf

    num_processes = num_processes or _world_size()
    _check_output_dir(OmegaConf.select(cfg, "train.output_dir", default=None), "train.output_dir")
    batch = OmegaConf.select(cfg, "dataloader.train.total_batch_size", default=None)
    if batch is None:
        return
    if not _is_int(batch) or batch <= 0:
        raise ValueError(f"dataloader.train.total_batch_size must be an integer >= 1, got "
                         f"{batch!r}")
    if batch % num_processes:
        raise ValueError(f"dataloader.train.total_batch_size {batch} is not divisible by the "
                         f"{num_processes} processes (--num-gpus x --num-machines)")


def _flatten(node, prefix: str = "") -> Dict[str, object]:
    out = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = _lists(node)
    return out


def _lists(value):
    """Tuples as lists, at any depth (a YAML file holds lists where the config has tuples)."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def check_resume_compatible(cfg, resume: bool) -> None:
    """
    With ``resume``, compare the model keys (``MODEL.*`` but ``MODEL.WEIGHTS`` and
    ``MODEL.DEVICE``) with those of the run that wrote the checkpoints
    (``OUTPUT_DIR/config.yaml``), before that file is rewritten: a model of another
    architecture or class count cannot take its checkpoint or optimizer state.

    Raises:
        ValueError: naming each changed key, both values and the file.
    """
    from ..io.config_files import ConfigFileError, read_yaml_config

    if not resume or not cfg.OUTPUT_DIR:
        return
    saved_path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) \
            or not os.path.isfile(saved_path):
        return
    try:
        saved = read_yaml_config(saved_path)
    except ConfigFileError as e:
        logger.warning(f"--resume: cannot compare with the previous run's config ({e})")
        return
    before = {k: v for k, v in _flatten(saved.get("MODEL", {}), "MODEL.").items()
              if k not in _RESUMABLE_CHANGES}
    now = {k: v for k, v in _flatten(dict(cfg.MODEL), "MODEL.").items()
           if k not in _RESUMABLE_CHANGES}
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:_NAMED])
        more = f" and {len(changed) - _NAMED} more" if len(changed) > _NAMED else ""
        raise ValueError(
            f"cannot resume: the model differs from the run that wrote the checkpoints in "
            f"{cfg.OUTPUT_DIR!r} ({saved_path}): {shown}{more}. Resume with the same model keys, "
            "or start without --resume in another OUTPUT_DIR")


def _thing_classes(name: str) -> Optional[List[str]]:
    from detectron2.data import MetadataCatalog

    if name not in MetadataCatalog.list():
        return None
    return getattr(MetadataCatalog.get(name), "thing_classes", None)


def _classes_before_loading(name: str) -> Optional[List[str]]:
    """A dataset's classes before its records are loaded: the metadata's, else the COCO
    file's categories, else the shapes dataset's (registered later by the entries)."""
    from detectron2.data import MetadataCatalog

    from ..io.coco import read_coco_json
    from .shapes import SHAPE_CLASSES, SHAPES_DATASET_NAMES

    classes = _thing_classes(name)
    if classes is not None:
        return classes
    json_file = getattr(MetadataCatalog.get(name), "json_file", None) \
        if name in MetadataCatalog.list() else None
    if json_file and os.path.isfile(json_file):
        return [str(c.get("name")) for c in read_coco_json(json_file)["categories"]]
    if name in SHAPES_DATASET_NAMES:
        return list(SHAPE_CLASSES)
    return None


def _check_eval_classes(cfg, datasets: Sequence[str]) -> None:
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in datasets:
        classes = _classes_before_loading(name)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but the evaluation set {name!r} "
                f"has {len(classes)} classes; evaluating would fail after inference. Set "
                f"MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} (and weights trained for it)")


def check_before_setup(cfg, args) -> None:
    """
    Everything :func:`check_run_config`, :func:`check_resume_compatible` and the eval-only
    class check can tell from the config alone, for the training entries (yacs or LazyConfig
    ``cfg``; ``args`` from Detectron2's ``default_argument_parser``).
    """
    from omegaconf import DictConfig

    if isinstance(cfg, DictConfig):
        check_lazy_run_config(cfg)
        return
    check_run_config(cfg)
    check_resume_compatible(cfg, bool(getattr(args, "resume", False)))
    if getattr(args, "eval_only", False):
        _check_eval_classes(cfg, cfg.DATASETS.TEST)


def _segmentation_kind(records: Sequence[Dict]) -> Optional[Dict]:
    """The first annotation whose mask is RLE (a dict), with its record, or None."""
    for record in records:
        for index, anno in enumerate(record.get("annotations", [])):
            if isinstance(anno.get("segmentation"), dict):
                return {"record": record, "index": index}
    return None


def check_config_against_data(cfg, train_records: Sequence[Dict]) -> None:
    """
    ``MODEL.ROI_HEADS.NUM_CLASSES`` against the training sets' classes and labels, and
    ``INPUT.MASK_FORMAT`` against the masks of ``train_records`` (see the module docstring).

    Raises:
        ValueError: naming the key, the dataset (or file and image id) and both values.
    """
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in cfg.DATASETS.TRAIN:
        classes = _thing_classes(name)
        if classes is None:
            continue
        if len(classes) > num_classes:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but the training set {name!r} has "
                f"{len(classes)} classes; labels >= {num_classes} have no output. Set "
                f"MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}")
        if len(classes) < num_classes:
            logger.warning(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but the training set {name!r} has "
                f"{len(classes)} classes: {num_classes - len(classes)} output(s) will never see "
                f"an example (set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} unless intended)")
    labels = [a.get("category_id") for r in train_records for a in r.get("annotations", [])]
    top = max((c for c in labels if _is_int(c)), default=None)
    if top is not None and top >= num_classes:
        raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but the training records "
                         f"hold category id {top} (ids run from 0 to NUM_CLASSES - 1)")
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon":
        found = _segmentation_kind(train_records)
        if found is not None:
            record = found["record"]
            raise ValueError(
                f"INPUT.MASK_FORMAT is 'polygon' but {record.get('file_name')!r} (image id "
                f"{record.get('image_id')!r}, annotation {found['index']}) has an RLE mask; set "
                "INPUT.MASK_FORMAT bitmask to train on RLE masks")

