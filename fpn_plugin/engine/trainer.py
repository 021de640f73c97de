"""
``Trainer``: Detectron2's ``DefaultTrainer`` with what a plugin model needs and nothing else.

Differences from ``DefaultTrainer``:

- Checkpoints are read and written by ``fpn_plugin.checkpoint.SafeDetectionCheckpointer``
  (``MODEL.WEIGHTS``, ``--resume``): a weights file never runs code, a save is atomic, and a
  resume whose last checkpoint is damaged falls back to the newest intact one with a warning.
  Checkpoints hold the optimizer state on Detectron2 v0.6 too (main already saves it), so
  ``--resume`` continues with the same momentum / Adam moments.
- Datasets are validated once, before training (``fpn_plugin.data.build.validate_datasets``,
  policy ``DATALOADER.INVALID_RECORDS``): the report is kept as ``trainer.dataset_check``,
  written to ``<OUTPUT_DIR>/invalid_records.json`` and counted as
  ``data/invalid_records_skipped`` in the metrics; the training loader reuses the checked
  records. Image reads are checked against ``INPUT.MAX_IMAGE_PIXELS`` and name the file on a
  decode error.
- ``SOLVER.OPTIMIZER`` picks Detectron2's SGD or AdamW (same parameter groups and clipping).
- ``SOLVER.DIVERGENCE_FACTOR``: training stops with an error naming the iteration and
  ``SOLVER.BASE_LR`` when the loss explodes (a non-finite loss, which already stops
  Detectron2, is reported the same way).
- ``build_evaluator`` returns COCO evaluation that works without Detectron2's compiled ops.
- ``SOLVER.AMP.ENABLED`` trains with the plugin's fast training path
  (``fpn_plugin.engine.precision``) instead of Detectron2's ``AMPTrainer``: per-component
  autocast in ``SOLVER.AMP.PRECISION`` (bf16 on CPU or CUDA, fp16 with a gradient scaler on
  CUDA; losses, anchor matching, box decoding and ROIAlign stay fp32), and
  ``SOLVER.CHANNELS_LAST`` trains the convolutional components in NHWC, with or without AMP.
  Checked at build time (a precision the device cannot run is refused naming the key).
  Evaluation during training runs fp32; checkpoints are fp32 either way.
- A training-curve picture (``training_curve.png``: losses and AP over iterations) is written
  to ``OUTPUT_DIR`` after training; temporary files a killed run left there are removed first.
- With several processes the model is wrapped by ``fpn_plugin.engine.ddp.create_ddp_model``:
  Detectron2's on GPUs, without ``device_ids`` on CPU (gloo), which Detectron2's refuses.
- ``resume_or_load`` checks that every rank starts at the same iteration.

The constructor is written out on the loop builder the LazyConfig trainer uses
(``fpn_plugin.engine.precision.build_train_loop``), in the steps of ``DefaultTrainer``'s own
(Detectron2 v0.6 and main alike): nothing in Detectron2 is rebound or patched. Everything else
(checkpointing every ``SOLVER.CHECKPOINT_PERIOD``, metrics.json / TensorBoard writers,
``TEST.EVAL_PERIOD`` evaluation, PreciseBN, multi-GPU through ``detectron2.engine.launch``) is
Detectron2's own hooks and methods.
"""
import logging
import os
import weakref
from typing import List, Optional

import torch
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, TrainerBase
from detectron2.engine import hooks as d2_hooks
from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules

from ..checkpoint import SafeDetectionCheckpointer
from ..data.build import check_invalid_record_policy, get_validated_dataset_dicts, validate_datasets
from ..data.config import add_data_config
from ..data.images import CheckedMapper
from ..utils.config import with_missing_keys
from ..utils.files import safe_file_stem
from .config import OPTIMIZERS, add_engine_config
from .datasets import prepare_output_and_check_datasets
from .ddp import check_resumed_alike
from .hooks import (
    INVALID_RECORDS_METRIC,
    DivergenceGuard,
    InvalidRecordsMetric,
    TrainingCurve,
    TrainingDivergedError,
    divergence_reported,
)
from .precision import build_train_loop
from .settings import YAML_KEYS, check_precision_settings, check_training_settings, yaml_reader

__all__ = ["INVALID_RECORDS_METRIC", "Trainer", "TrainingDivergedError", "build_evaluator_for",
           "build_optimizer_for", "check_amp_config", "check_training_config",
           "with_training_defaults"]

logger = logging.getLogger(__name__)


def with_training_defaults(cfg):
    """
    ``cfg`` with the keys the trainer reads (``fpn_plugin.engine`` and ``fpn_plugin.data``
    keys) at their defaults where it lacks them. The model's components ask for their own keys
    (``fpn_plugin.add_fpn_plugin_config``) when they are built.
    """
    return with_missing_keys(cfg, (add_data_config, add_engine_config))


def check_amp_config(cfg) -> str:
    """
    The training precision the config asks for: ``"fp32"`` unless ``SOLVER.AMP.ENABLED``, else
    ``SOLVER.AMP.PRECISION`` for ``MODEL.DEVICE`` (``"auto"``: fp16 on CUDA, bf16 on CPU).
    Raises a ``ValueError`` naming the key when a value is unknown or cannot work on the device
    (fp16 off CUDA, bf16 on a CUDA device without it, a CUDA device that is absent).
    """
    return check_precision_settings(yaml_reader(cfg), YAML_KEYS)


def build_evaluator_for(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """COCO box (and mask, if ``MODEL.MASK_ON``) evaluation of a registered dataset."""
    if output_folder is None:  # the name comes from the config: keep it one folder deep
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", safe_file_stem(dataset_name))
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    from ..evaluation.coco import build_coco_evaluator

    return build_coco_evaluator(dataset_name, output_folder, tasks=tasks)


def check_optimizer_config(cfg) -> str:
    """Return ``SOLVER.OPTIMIZER`` if known, else raise a ``ValueError`` naming the key."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    return name


def check_training_config(cfg) -> str:
    """
    The trainer's one validation point: every key it reads itself, checked before anything is
    built (each error names its key; the rules shared with the LazyConfig trainer are
    ``fpn_plugin.engine.settings``'). Returns the training precision.
    """
    precision = check_training_settings(yaml_reader(cfg), YAML_KEYS)
    check_optimizer_config(cfg)
    return precision


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


class Trainer(DefaultTrainer):
    """
    ``DefaultTrainer`` with safe checkpoints, validated datasets, COCO evaluation, mixed
    precision and channels-last training, a divergence guard and a training-curve picture (see
    the module docstring). Build it like ``DefaultTrainer``: ``Trainer(cfg)``, then
    ``resume_or_load(resume=...)`` and ``train()``. A config without the plugin's training keys
    gets their defaults (:func:`with_training_defaults`).

    Attributes:
        dataset_check (DatasetCheck): the validated records and every problem found in
            ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (their records were skipped; under policy
            "error" construction raises instead).
        invalid_records (list[InvalidRecord]): ``dataset_check.problems``.
        precision (str): the training precision ("fp32", "bf16" or "fp16").
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, with the plugin's loop, wrapping and checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # as DefaultTrainer: setup_logger was not called for Detectron2
        cfg = with_training_defaults(cfg)
        self.precision = check_training_config(cfg)
        self.dataset_check = prepare_output_and_check_datasets(
            cfg.OUTPUT_DIR, lambda report_path: validate_datasets(cfg, report_path=report_path))
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg, records=self.dataset_check.train_records)
        # The fast training path is set up on the bare model, before the DDP wrapping (which
        # fixes the gradient layout); the loop is the plugin's (fp16: with a gradient scaler).
        self._trainer = build_train_loop(
            model, data_loader, optimizer, precision=self.precision,
            channels_last=cfg.SOLVER.CHANNELS_LAST, ddp_kwargs={"broadcast_buffers": False})
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @property
    def invalid_records(self):
        return self.dataset_check.problems

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

    def resume_or_load(self, resume=True):
        """Detectron2's, then a check that every rank starts at the same iteration
        (:func:`fpn_plugin.engine.ddp.check_resumed_alike`; a collective)."""
        super().resume_or_load(resume=resume)
        check_resumed_alike(self)

    def train(self):
        """Detectron2's training loop; a diverging run ends with its message, no traceback."""
        with divergence_reported("SOLVER.BASE_LR", self.cfg.SOLVER.BASE_LR):
            return super().train()

    @classmethod
    def build_train_loader(cls, cfg, records=None):
        """
        Detectron2's train loader over validated records of ``DATASETS.TRAIN`` (``records``
        when given, as the trainer passes its checked ones; else loaded and checked now), with
        image reads checked against ``INPUT.MAX_IMAGE_PIXELS``.
        """
        cfg = with_training_defaults(cfg)
        if records is None:
            check = validate_datasets(_without_test_sets(cfg))
            records = check.train_records
        mapper = CheckedMapper(DatasetMapper(cfg, True), cfg.INPUT.MAX_IMAGE_PIXELS)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=records)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """
        Detectron2's inference loader over ``dataset_name``, after checking its image files
        (inference never reads annotations, so only images can break it). Under "skip", an
        image that cannot be read is left out; its objects then count as missed in COCO AP.
        """
        cfg = with_training_defaults(cfg)
        proposal_files = None
        if cfg.MODEL.LOAD_PROPOSALS:
            index = list(cfg.DATASETS.TEST).index(dataset_name)
            proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[index]]
        records, _ = get_validated_dataset_dicts(
            [dataset_name],
            policy=check_invalid_record_policy(cfg.DATALOADER.INVALID_RECORDS),
            check_images=cfg.DATALOADER.CHECK_IMAGES,
            check_annotations=False,
            filter_empty=False,
            proposal_files=proposal_files,
            max_image_pixels=cfg.INPUT.MAX_IMAGE_PIXELS,
            ground_truth_problems_fatal=True,
        )
        mapper = CheckedMapper(DatasetMapper(cfg, False), cfg.INPUT.MAX_IMAGE_PIXELS)
        return build_detection_test_loader(dataset=records, mapper=mapper,
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD or AdamW, by ``SOLVER.OPTIMIZER``."""
        return build_optimizer_for(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator_for(cfg, dataset_name, output_folder)

    def build_hooks(self) -> List[HookBase]:
        """
        ``DefaultTrainer``'s hooks in its order (timer, LR schedule, PreciseBN, checkpoints,
        evaluation, writers), with the plugin's: the skipped-records metric and the divergence
        guard first (a diverged model is never checkpointed or evaluated), the training curve
        last (after the writers have flushed metrics.json). PreciseBN gets a loader over the
        records already checked.
        """
        cfg, main = self.cfg, comm.is_main_process()
        hooks = [InvalidRecordsMetric(self.dataset_check.num_skipped)]
        if cfg.SOLVER.DIVERGENCE_FACTOR:
            hooks.append(DivergenceGuard(cfg.SOLVER.DIVERGENCE_FACTOR, cfg.SOLVER.BASE_LR))
        hooks += [
            d2_hooks.IterationTimer(),
            d2_hooks.LRScheduler(),
            self._precise_bn_hook(),
            d2_hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD)
            if main else None,
            d2_hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._test_and_keep_results),
            d2_hooks.PeriodicWriter(self.build_writers(), period=20) if main else None,
            TrainingCurve(cfg.OUTPUT_DIR) if main else None,
        ]
        return [h for h in hooks if h is not None]

    def _precise_bn_hook(self) -> Optional[HookBase]:
        if not (self.cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model)):
            return None
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as Detectron2: save memory and time for PreciseBN
        loader = self.build_train_loader(cfg, records=self.dataset_check.train_records)
        return d2_hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, loader,
                                  cfg.TEST.PRECISE_BN.NUM_ITER)

    def _test_and_keep_results(self):
        # DefaultTrainer.train reads _last_eval_results for TEST.EXPECTED_RESULTS.
        self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results


def _without_test_sets(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    return cfg
