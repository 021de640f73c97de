"""
``Trainer``: Detectron2's ``DefaultTrainer`` with what a plugin model needs and nothing else.

Differences from ``DefaultTrainer``:

- Datasets are validated before training (``fpn_plugin.data.build``, policy
  ``DATALOADER.INVALID_RECORDS``); skipped records are listed in
  ``<OUTPUT_DIR>/invalid_records.json`` and counted as ``data/invalid_records_skipped`` in the
  metrics (metrics.json, TensorBoard).
- ``SOLVER.OPTIMIZER`` picks Detectron2's SGD or AdamW (same parameter groups and clipping).
- ``build_evaluator`` returns COCO evaluation that works without Detectron2's compiled ops.
- ``SOLVER.AMP.ENABLED`` is checked at build time: Detectron2's ``AMPTrainer`` (fp16 autocast
  and GradScaler) needs CUDA, so on another device the trainer refuses with a ``ValueError``
  instead of failing at the first iteration.
- A training-curve picture (``training_curve.png``: losses and AP over iterations) is written
  to ``OUTPUT_DIR`` after training.

- Checkpoints hold the optimizer state on Detectron2 v0.6 too (main already saves it), so
  ``--resume`` continues with the same momentum / Adam moments.

- With several processes on CPU (gloo), the model is wrapped in DDP without ``device_ids``
  (``fpn_plugin.engine.ddp``): Detectron2 passes them whatever the device, which DDP refuses
  for a CPU model. On GPUs the wrapping is Detectron2's unchanged.

Everything else (checkpointing every ``SOLVER.CHECKPOINT_PERIOD``, ``--resume`` from
``last_checkpoint``, metrics.json / TensorBoard writers, ``TEST.EVAL_PERIOD`` evaluation,
multi-GPU through ``detectron2.engine.launch``) is Detectron2's own.
"""
import logging
import os
from typing import List, Optional

import torch
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..data.build import check_invalid_record_policy, get_validated_dataset_dicts, write_invalid_records
from .config import OPTIMIZERS
from .ddp import cpu_capable_ddp
from .plotting import plot_training_curve

__all__ = ["Trainer", "check_amp_config", "check_optimizer_config", "build_evaluator_for",
           "build_optimizer_for"]

logger = logging.getLogger(__name__)

INVALID_RECORDS_METRIC = "data/invalid_records_skipped"


def check_amp_config(cfg) -> None:
    """Raise a ``ValueError`` if ``SOLVER.AMP.ENABLED`` is set where it cannot work."""
    if not cfg.SOLVER.AMP.ENABLED:
        return
    device = str(cfg.MODEL.DEVICE)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ValueError(
            f"SOLVER.AMP.ENABLED=True needs a CUDA device, but MODEL.DEVICE={device!r}"
            f"{'' if torch.cuda.is_available() else ' and CUDA is not available'}: Detectron2's "
            "AMPTrainer runs fp16 autocast with a CUDA GradScaler. Set SOLVER.AMP.ENABLED False "
            "to train in fp32 on this device.")


def build_evaluator_for(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """COCO box (and mask, if ``MODEL.MASK_ON``) evaluation of a registered dataset."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    try:
        from ..evaluation.coco import build_coco_evaluator
    except ImportError:  # the evaluation package may be absent in a partial install
        from detectron2.evaluation import COCOEvaluator

        from ..utils.env import has_compiled_ops

        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                             use_fast_impl=has_compiled_ops())
    return build_coco_evaluator(dataset_name, output_folder, tasks=tasks)


def check_optimizer_config(cfg) -> str:
    """Return ``SOLVER.OPTIMIZER`` if known, else raise a ``ValueError`` naming the key."""
    name = cfg.SOLVER.get("OPTIMIZER", "SGD")
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    return name


def build_optimizer_for(cfg, model) -> torch.optim.Optimizer:
    """
    The optimizer named by ``SOLVER.OPTIMIZER``: Detectron2's SGD, or AdamW with the same
    parameter groups (per-parameter weight decay / LR factors) and gradient clipping.
    """
    if check_optimizer_config(cfg) == "SGD":
        return build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


class _InvalidRecordsMetric(HookBase):
    """Puts the number of skipped dataset records into the metrics when training starts."""

    def __init__(self, num_skipped: int):
        self._num_skipped = num_skipped

    def before_train(self):
        self.trainer.storage.put_scalar(INVALID_RECORDS_METRIC, self._num_skipped,
                                        smoothing_hint=False)


class _TrainingCurve(HookBase):
    """Draws ``training_curve.png`` from metrics.json once the writers have flushed it."""

    def __init__(self, output_dir: str):
        self._output_dir = output_dir

    def after_train(self):
        metrics = os.path.join(self._output_dir, "metrics.json")
        if not os.path.isfile(metrics):
            return
        try:
            path = plot_training_curve(metrics, os.path.join(self._output_dir, "training_curve.png"))
            logger.info(f"Training curve written to {path}")
        except Exception as e:  # a plot must never turn a finished training into a failure
            logger.warning(f"Could not draw the training curve: {e}")


class Trainer(DefaultTrainer):
    """
    ``DefaultTrainer`` with validated datasets, COCO evaluation, an AMP check and a
    training-curve picture (see the module docstring). Build it like ``DefaultTrainer``:
    ``Trainer(cfg)``, then ``resume_or_load(resume=...)`` and ``train()``.

    Attributes:
        invalid_records (list[InvalidRecord]): problems found in the training datasets
            (their records were skipped; under policy "error" construction raises instead).
    """

    def __init__(self, cfg):
        check_amp_config(cfg)
        check_invalid_record_policy(cfg.DATALOADER.INVALID_RECORDS)
        check_optimizer_config(cfg)
        # Inference sets are read only at evaluation, possibly hours from now: check their
        # images first, so a bad file stops the run now (policy "error") or is skipped later.
        for name in cfg.DATASETS.TEST:
            self.build_test_loader(cfg, name)
        with cpu_capable_ddp():  # Detectron2's DDP wrapping refuses CPU models (device_ids)
            super().__init__(cfg)
        loader = self._trainer.data_loader
        self.invalid_records = list(getattr(loader, "fpn_plugin_invalid_records", []))
        if self.invalid_records and comm.is_main_process():
            path = os.path.join(cfg.OUTPUT_DIR, "invalid_records.json")
            write_invalid_records(self.invalid_records, path)
            logger.warning(f"{len(self.invalid_records)} problem(s) in the training data; "
                           f"the records were skipped and are listed in {path}")

    # Detectron2 main checkpoints the inner trainer (optimizer state, AMP grad scaler) under
    # "_trainer"; v0.6 saves only the iteration and hook state, so a resumed run would restart
    # momentum / Adam moments from zero. Do what main does where the base class does not.
    _BASE_SAVES_TRAINER = "state_dict" in DefaultTrainer.__dict__

    def state_dict(self):
        ret = super().state_dict()
        if not self._BASE_SAVES_TRAINER:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not self._BASE_SAVES_TRAINER and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def _skipped_record_count(cls, invalid) -> int:
        return len({(p.dataset, p.file_name, p.image_id) for p in invalid})

    @classmethod
    def build_train_loader(cls, cfg):
        """
        Detectron2's train loader over the validated records of ``DATASETS.TRAIN``.

        Returns:
            the data loader; its attribute ``fpn_plugin_invalid_records`` lists the problems
            found (``DefaultTrainer`` builds the loader inside its constructor, so the report
            travels with it).
        """
        records, invalid = get_validated_dataset_dicts(
            cfg.DATASETS.TRAIN,
            policy=check_invalid_record_policy(cfg.DATALOADER.INVALID_RECORDS),
            check_images=cfg.DATALOADER.CHECK_IMAGES,
            require_segmentation=cfg.MODEL.MASK_ON,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                           if cfg.MODEL.KEYPOINT_ON else 0),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        loader = build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, True), dataset=records)
        loader.fpn_plugin_invalid_records = invalid
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """
        Detectron2's inference loader over ``dataset_name``, after checking its image files
        (inference never reads annotations, so only images can break it). Under "skip", an
        image that cannot be read is left out; its objects then count as missed in COCO AP.
        """
        proposal_files = None
        if cfg.MODEL.LOAD_PROPOSALS:
            proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]]
        records, _ = get_validated_dataset_dicts(
            [dataset_name],
            policy=check_invalid_record_policy(cfg.DATALOADER.INVALID_RECORDS),
            check_images=cfg.DATALOADER.CHECK_IMAGES,
            check_annotations=False,
            filter_empty=False,
            proposal_files=proposal_files,
        )
        return build_detection_test_loader(dataset=records, mapper=DatasetMapper(cfg, False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD or AdamW, by ``SOLVER.OPTIMIZER``."""
        return build_optimizer_for(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator_for(cfg, dataset_name, output_folder)

    def build_hooks(self) -> List[HookBase]:
        hooks = super().build_hooks()
        num_skipped = self._skipped_record_count(
            getattr(self._trainer.data_loader, "fpn_plugin_invalid_records", []))
        hooks.insert(0, _InvalidRecordsMetric(num_skipped))
        if comm.is_main_process():
            # Last, so it runs after PeriodicWriter has flushed metrics.json in after_train.
            hooks.append(_TrainingCurve(self.cfg.OUTPUT_DIR))
        return hooks
