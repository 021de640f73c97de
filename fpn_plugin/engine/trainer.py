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
- With several processes on CPU (gloo), the model is wrapped in DDP without ``device_ids``
  (``fpn_plugin.engine.ddp``): Detectron2 passes them whatever the device, which DDP refuses
  for a CPU model. On GPUs the wrapping is Detectron2's unchanged.

Everything else (checkpointing every ``SOLVER.CHECKPOINT_PERIOD``, metrics.json / TensorBoard
writers, ``TEST.EVAL_PERIOD`` evaluation, multi-GPU through ``detectron2.engine.launch``) is
Detectron2's own.
"""
import contextlib
import functools
import logging
import math
import os
import statistics
from typing import Iterator, List, Optional

import torch
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.engine import defaults as _d2_defaults
from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import SafeDetectionCheckpointer
from ..data.build import (
    DatasetCheck,
    InvalidRecordsError,
    check_invalid_record_policy,
    get_validated_dataset_dicts,
    validate_datasets,
    write_invalid_records,
)
from ..data.images import CheckedMapper, check_max_image_pixels
from ..utils.files import remove_stale_temp_files, safe_file_stem
from .config import AMP_PRECISIONS, OPTIMIZERS
from .ddp import cpu_capable_ddp
from .plotting import plot_training_curve
from .precision import check_training_precision, enable_fast_training, make_train_loop

__all__ = ["Trainer", "TrainingDivergedError", "check_amp_config", "check_training_config",
           "build_evaluator_for", "build_optimizer_for", "divergence_reported"]

logger = logging.getLogger(__name__)

INVALID_RECORDS_METRIC = "data/invalid_records_skipped"
INVALID_RECORDS_FILE = "invalid_records.json"


class TrainingDivergedError(FloatingPointError):
    """The training loss exploded (see ``SOLVER.DIVERGENCE_FACTOR``)."""


def check_amp_config(cfg) -> str:
    """
    The training precision the config asks for: ``"fp32"`` unless ``SOLVER.AMP.ENABLED``, else
    ``SOLVER.AMP.PRECISION`` for ``MODEL.DEVICE`` (``"auto"``: fp16 on CUDA, bf16 on CPU).
    Raises a ``ValueError`` naming the key when a value is unknown or cannot work on the device
    (fp16 off CUDA, bf16 on a CUDA device without it, a CUDA device that is absent).
    """
    amp = cfg.SOLVER.AMP
    if not isinstance(amp.ENABLED, bool):
        raise ValueError(f"SOLVER.AMP.ENABLED must be True or False, got {amp.ENABLED!r}")
    device = str(cfg.MODEL.DEVICE)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if amp.PRECISION not in AMP_PRECISIONS:  # checked even when off: a typo fails now
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {AMP_PRECISIONS}, got "
                         f"{amp.PRECISION!r}")
    if not amp.ENABLED:
        return check_training_precision("fp32", device_type, cfg.SOLVER.CHANNELS_LAST)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"SOLVER.AMP.ENABLED=True with MODEL.DEVICE={device!r}, but CUDA is not "
                         "available")
    return check_training_precision(amp.PRECISION, device_type, cfg.SOLVER.CHANNELS_LAST)


def build_evaluator_for(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """COCO box (and mask, if ``MODEL.MASK_ON``) evaluation of a registered dataset."""
    if output_folder is None:  # the name comes from the config: keep it one folder deep
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", safe_file_stem(dataset_name))
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
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    return name


def check_training_config(cfg) -> None:
    """
    The trainer's one validation point: every key it reads itself, checked before anything is
    built (each error names its key).
    """
    check_amp_config(cfg)
    check_invalid_record_policy(cfg.DATALOADER.INVALID_RECORDS)
    check_optimizer_config(cfg)
    check_max_image_pixels(cfg.INPUT.MAX_IMAGE_PIXELS)
    factor = cfg.SOLVER.DIVERGENCE_FACTOR
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or \
            not math.isfinite(factor) or (factor != 0 and factor <= 1):
        raise ValueError(f"SOLVER.DIVERGENCE_FACTOR must be 0 (off) or a finite number > 1, "
                         f"got {factor!r}")
    lr = cfg.SOLVER.BASE_LR
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"SOLVER.BASE_LR must be a finite number > 0, got {lr!r}")


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


class _DivergenceGuard(HookBase):
    """
    Stops training when the total loss explodes: the median of the last ``window`` losses
    above ``factor`` times the start's loss (the lowest of the first ``window``: a learning
    rate far too high blows the loss up within the first few steps). Raises
    :class:`TrainingDivergedError` naming the iteration and ``SOLVER.BASE_LR``.
    """

    def __init__(self, factor: float, base_lr: float, window: int = 5,
                 keys=("SOLVER.DIVERGENCE_FACTOR", "SOLVER.BASE_LR")):
        self._factor = factor
        self._base_lr = base_lr
        self._window = window
        self._factor_key, self._lr_key = keys  # named in the message (YAML or LazyConfig)
        self._reference: Optional[float] = None

    def after_step(self):
        try:
            history = self.trainer.storage.history("total_loss")
        except KeyError:  # only the main process records losses
            return
        values = [v for v, _ in history.values()]
        if len(values) < self._window:
            return
        if self._reference is None:
            self._reference = min(values[:self._window])
        recent = statistics.median(values[-self._window:])
        if self._reference > 0 and recent > self._factor * self._reference:
            message = (
                f"training diverged at iteration {self.trainer.iter}: the total loss (median "
                f"of the last {self._window} iterations) is {recent:.4g}, more than "
                f"{self._factor_key}={self._factor:g} times its value at the start "
                f"({self._reference:.4g}). Lower {self._lr_key} (now {self._base_lr:g}) and "
                "start again (or --resume from a checkpoint written before the divergence).")
            logger.error(message)
            raise TrainingDivergedError(message)


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


class _NoTracebackForDivergence(logging.Filter):
    """Detectron2's train loop logs every exception with its traceback; a diverging run is
    reported by the error message alone."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], FloatingPointError))


@contextlib.contextmanager
def divergence_reported(lr_key: str, lr: float) -> Iterator[None]:
    """
    Around a Detectron2 training loop: a diverging run (the divergence guard's error, or
    Detectron2's "Loss became infinite or NaN") ends with a :class:`TrainingDivergedError`
    whose message names the learning rate's setting ``lr_key`` and value, and Detectron2's
    loop logs it without a traceback.
    """
    loop_logger = logging.getLogger("detectron2.engine.train_loop")
    quiet = _NoTracebackForDivergence()
    loop_logger.addFilter(quiet)
    try:
        yield
    except TrainingDivergedError:
        raise
    except FloatingPointError as e:  # Detectron2's "Loss became infinite or NaN at ..."
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "non-finite loss"
        raise TrainingDivergedError(
            f"training diverged: {first_line} Lower {lr_key} (now {lr:g}) and start again "
            "(or --resume from a checkpoint written before the divergence).") from e
    finally:
        loop_logger.removeFilter(quiet)


def prepare_output_and_check_datasets(output_dir: str, validate) -> DatasetCheck:
    """
    What both training entries do before building anything: create ``output_dir`` and remove
    the partial files an interrupted run left there (main process), then validate the datasets
    with ``validate(report_path)`` (the report path on the main process, else None) and list
    every problem found in ``output_dir/invalid_records.json``, also when the policy refuses
    the run (``InvalidRecordsError`` is re-raised after the report is written).
    """
    main = comm.is_main_process()
    if main:
        os.makedirs(output_dir, exist_ok=True)
        for path in remove_stale_temp_files(output_dir):
            logger.info(f"Removed {path}, a partial file left by an interrupted run")
    report = os.path.join(output_dir, INVALID_RECORDS_FILE)
    try:
        check = validate(report if main else None)
    except InvalidRecordsError as e:  # the full list goes to the report the message names
        if main:
            write_invalid_records(e.problems, report)
        raise
    if check.problems and main:
        write_invalid_records(check.problems, report)
        logger.warning(f"{len(check.problems)} record(s) of the datasets were left out "
                       f"({check.num_skipped} image record(s) with problems); all are listed "
                       f"in {report}")
    return check


class Trainer(DefaultTrainer):
    """
    ``DefaultTrainer`` with safe checkpoints, validated datasets, COCO evaluation, mixed
    precision and channels-last training, a divergence guard and a training-curve picture (see the module docstring). Build it like
    ``DefaultTrainer``: ``Trainer(cfg)``, then ``resume_or_load(resume=...)`` and ``train()``.
    A config without the plugin's keys gets their defaults
    (``fpn_plugin.config.with_plugin_defaults``).

    Attributes:
        dataset_check (DatasetCheck): the validated records and every problem found in
            ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (their records were skipped; under policy
            "error" construction raises instead).
        invalid_records (list[InvalidRecord]): ``dataset_check.problems``.
    """

    def __init__(self, cfg):
        cfg = _with_plugin_defaults(cfg)
        check_training_config(cfg)
        self.dataset_check = prepare_output_and_check_datasets(
            cfg.OUTPUT_DIR, lambda report_path: validate_datasets(cfg, report_path=report_path))
        # DefaultTrainer.__init__ (and PreciseBN) call self.build_train_loader(cfg): hand them
        # the records checked above rather than loading and checking DATASETS.TRAIN again.
        self.build_train_loader = functools.partial(
            type(self).build_train_loader, records=self.dataset_check.train_records)
        # The fast training path is set up on the model DefaultTrainer builds, before its DDP
        # wrapping (which fixes the gradient layout), and replaces AMPTrainer as the loop.
        precision, channels_last = check_amp_config(cfg), cfg.SOLVER.CHANNELS_LAST
        self.build_model = lambda c: enable_fast_training(type(self).build_model(c), precision,
                                                          channels_last)
        try:
            # Detectron2's DDP wrapping refuses CPU models (device_ids).
            with cpu_capable_ddp(), _plugin_amp_loop(precision):
                super().__init__(cfg)
        finally:
            del self.build_train_loader
            del self.build_model
        self.precision = precision

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
        cfg = _with_plugin_defaults(cfg)
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
        cfg = _with_plugin_defaults(cfg)
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
        # DefaultTrainer.__init__ made a DetectionCheckpointer, which unpickles .pkl files
        # freely; swap it for the safe one before the checkpoint hook takes it.
        self.checkpointer = SafeDetectionCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **self.checkpointer.checkpointables)
        hooks = super().build_hooks()
        hooks.insert(0, _InvalidRecordsMetric(self.dataset_check.num_skipped))
        if self.cfg.SOLVER.DIVERGENCE_FACTOR:
            # Early, so that a diverged model is never checkpointed or evaluated.
            hooks.insert(1, _DivergenceGuard(self.cfg.SOLVER.DIVERGENCE_FACTOR,
                                             self.cfg.SOLVER.BASE_LR))
        if comm.is_main_process():
            # Last, so it runs after PeriodicWriter has flushed metrics.json in after_train.
            hooks.append(_TrainingCurve(self.cfg.OUTPUT_DIR))
        return hooks


@contextlib.contextmanager
def _plugin_amp_loop(precision: str):
    """
    Within the block, ``DefaultTrainer``'s constructor makes the plugin's loop
    (``make_train_loop``: the gradient scaler for fp16, none for bf16) where it would make
    Detectron2's ``AMPTrainer`` (whole-forward autocast, fp16 only; it looks the class up in
    ``detectron2.engine.defaults`` at call time and has no hook for it).
    """
    original = _d2_defaults.AMPTrainer
    _d2_defaults.AMPTrainer = functools.partial(make_train_loop, precision=precision)
    try:
        yield
    finally:
        _d2_defaults.AMPTrainer = original


def _with_plugin_defaults(cfg):
    # Imported here: fpn_plugin.config imports this package (for its config keys).
    from ..config import with_plugin_defaults

    return with_plugin_defaults(cfg)


def _without_test_sets(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    return cfg
