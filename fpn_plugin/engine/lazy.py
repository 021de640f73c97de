"""
Training and evaluation from Detectron2's Python configs (LazyConfig), the way Detectron2's
``tools/lazyconfig_train_net.py`` runs them, with what the plugin's YAML trainer
(:class:`~fpn_plugin.engine.Trainer`) adds:

- :func:`load_lazy_config`: a ``.py`` config (a program: it runs when loaded, like any
  Detectron2 LazyConfig) or a ``.yaml`` one saved by ``LazyConfig.save``, which must be plain
  YAML (Detectron2 reads it with ``yaml.unsafe_load``, where a Python tag could run code), then
  ``key=value`` overrides; every error names the file or the override.
- The plugin's training settings, added with their defaults where a config lacks them
  (:data:`LAZY_TRAINING_DEFAULTS`, the twins of the YAML keys) and checked once, each error
  naming its key (:func:`check_lazy_training_config`: the config's structure here, the
  settings both formats share by :func:`fpn_plugin.engine.settings.check_training_settings`).
- Datasets named by ``get_detection_dataset_dicts`` nodes are validated once before training
  (:func:`validate_lazy_datasets`, policy ``dataloader.invalid_records``); the loaders get the
  checked records and check every image read (``dataloader.max_image_pixels``).
- Detectron2's ``COCOEvaluator`` uses its fast COCOeval only where the compiled ops exist.
- Checkpoints are read and written by :class:`~fpn_plugin.checkpoint.SafeDetectionCheckpointer`
  (optimizer state saved on Detectron2 v0.6 too); the divergence guard, the skipped-records
  metric and the training curve are :mod:`fpn_plugin.engine.hooks`, as for the YAML trainer.
- DDP through :func:`fpn_plugin.engine.ddp.create_ddp_model` (CPU models with gloo too);
  ``train.amp.enabled`` trains with the YAML entry's fast training path
  (:mod:`fpn_plugin.engine.precision`): ``train.amp.precision`` "auto" is fp16 with a gradient
  scaler on CUDA (as Detectron2's ``AMPTrainer``), bf16 on a CPU with native bf16 and fp32 on
  other CPUs; ``train.channels_last``.
  :func:`build_lazy_train_loop` is the one place that sets the model up, wraps it and picks
  the loop.
"""
import copy
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.engine import SimpleTrainer, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import SafeDetectionCheckpointer
from ..data.build import DatasetCheck, check_datasets
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, CheckedMapper
from ..utils.env import has_compiled_ops
from ..utils.files import safe_file_stem
from .datasets import prepare_output_and_check_datasets
from .ddp import check_started_alike
from .hooks import DivergenceGuard, InvalidRecordsMetric, TrainingCurve, divergence_reported
from .launch import call_in_rank_order
from .precision import build_train_loop
from .settings import LAZY_KEYS, check_precision_settings, check_training_settings, lazy_reader

__all__ = [
    "LAZY_TRAINING_DEFAULTS",
    "LazyTrainer",
    "add_lazy_training_defaults",
    "build_lazy_evaluator",
    "build_lazy_model",
    "build_lazy_test_loader",
    "build_lazy_train_loader",
    "build_lazy_train_loop",
    "check_lazy_training_config",
    "load_lazy_config",
    "register_lazy_datasets",
    "validate_lazy_datasets",
]

logger = logging.getLogger(__name__)

# The plugin's training settings in a LazyConfig (dotted key -> default), twins of the YAML
# keys DATALOADER.INVALID_RECORDS, DATALOADER.CHECK_IMAGES, INPUT.MAX_IMAGE_PIXELS,
# DATASETS.SHAPES.* and SOLVER.DIVERGENCE_FACTOR (same meanings and defaults).
LAZY_TRAINING_DEFAULTS: Dict[str, Any] = {
    "dataloader.invalid_records": "skip",
    "dataloader.check_images": True,
    "dataloader.max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
    "train.divergence_factor": 100.0,
    # The fast training path (fpn_plugin.engine.precision), twins of SOLVER.AMP.PRECISION and
    # SOLVER.CHANNELS_LAST: with train.amp.enabled, "auto" is fp16 on CUDA (with a gradient
    # scaler, as Detectron2's AMPTrainer), bf16 on a CPU with native bf16, fp32 on other CPUs.
    "train.amp.precision": "auto",
    "train.channels_last": False,
}
_SHAPES_FIELDS = (("num_train", 1), ("num_val", 1), ("image_size", 32), ("seed", 0))
# Entries of Detectron2's common/train.py that the trainer reads.
_TRAIN_KEYS = ("output_dir", "init_checkpoint", "max_iter", "amp", "ddp", "checkpointer",
               "eval_period", "log_period", "device")


# -- loading and checking ------------------------------------------------------------------------

def load_lazy_config(config_file: str, overrides=(), allow_target_prefixes=()) -> DictConfig:
    """
    Load a LazyConfig file, apply ``key=value`` overrides (Detectron2's
    ``LazyConfig.apply_overrides``) and add the plugin's training settings it lacks.

    A ``.py`` config is code and runs when loaded (run only configs you trust). A ``.yaml``
    one is data: it goes through :func:`fpn_plugin.io.check_lazy_yaml` first (plain YAML,
    every ``_target_`` under the allowed module prefixes plus ``allow_target_prefixes``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a .py/.yaml file, a YAML file with Python object tags or a
            ``_target_`` outside the allow-list, a file that fails to load, or an override
            that does not apply (naming the file, key path or override).
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file!r}")
    ext = os.path.splitext(config_file)[1]
    if ext not in (".py", ".yaml", ".yml"):
        raise ValueError(f"config file {config_file!r}: a LazyConfig is a .py or .yaml file")
    if ext != ".py":
        _check_plain_yaml(config_file, allow_target_prefixes)
    try:
        cfg = LazyConfig.load(config_file)
    except Exception as e:  # a syntax or import error inside the config, a broken YAML
        raise ValueError(f"config file {config_file!r} cannot be loaded: "
                         f"{type(e).__name__}: {e}") from e
    add_lazy_training_defaults(cfg)  # so overrides can set the plugin's settings
    if isinstance(cfg.get("train"), DictConfig) and "seed" not in cfg.train:
        cfg.train.seed = -1  # Detectron2's default_setup reads train.seed (-1: a random seed)
    for override in overrides:
        _check_override_key(cfg, override, config_file)
        try:
            LazyConfig.apply_overrides(cfg, [override])
        except Exception as e:  # hydra's parse errors, a key under a non-config value
            raise ValueError(f"override {override!r} does not apply to {config_file}: "
                             f"{type(e).__name__}: {e}") from e
    return cfg


_ABSENT = object()


def _check_override_key(cfg: DictConfig, override: str, config_file: str) -> None:
    """
    An override sets an entry the config has, or adds an argument to a ``LazyCall`` node
    (checked when the node is built), or says it adds (hydra's ``+key=value``). Anything else
    is a typo that Detectron2 would silently add as a new, unread entry.
    """
    if "=" not in override:
        raise ValueError(f"override {override!r}: overrides are key=value (e.g. train.max_iter=10)")
    key = override.split("=", 1)[0].strip()
    if key.startswith("+") or OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
        return
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if isinstance(parent, DictConfig) and "_target_" in parent:
        return
    entries = sorted(str(k) for k in parent.keys()) if isinstance(parent, DictConfig) else None
    where = f"{parent_key} has no entry {name!r}" + (f" (it has {entries})" if entries else "")
    raise ValueError(f"override {override!r} does not apply to {config_file}: {where}; "
                     f"write +{key}=... to add an entry on purpose")


def _check_plain_yaml(path: str, allow_target_prefixes=()) -> None:
    from ..io.lazy_yaml import check_lazy_yaml

    check_lazy_yaml(path, allow_target_prefixes)


def add_lazy_training_defaults(cfg: DictConfig) -> DictConfig:
    """Add each :data:`LAZY_TRAINING_DEFAULTS` key ``cfg`` lacks (in place; returns ``cfg``)."""
    for key, default in LAZY_TRAINING_DEFAULTS.items():
        *parents, name = key.split(".")
        node = OmegaConf.select(cfg, ".".join(parents), default=None)
        if isinstance(node, DictConfig) and name not in node:
            node[name] = default
    return cfg


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def _require(cfg: DictConfig, keys) -> None:
    missing = [k for k in keys if OmegaConf.select(cfg, k, default=None) is None]
    if missing:
        raise ValueError(
            f"the LazyConfig has no {', '.join(missing)} (a training config defines model, "
            "dataloader.train/test/evaluator, optimizer, lr_multiplier and train, e.g. from "
            "Detectron2's configs/common/train.py)")


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_lazy_training_config(cfg: DictConfig, eval_only: bool = False) -> None:
    """
    The LazyConfig trainer's one validation point: every setting it reads itself, checked
    before anything is built, each error naming its key.

    Raises:
        ValueError: a missing node or a bad value (naming the dotted key).
    """
    _require(cfg, ["model", "train", "dataloader.test", "dataloader.evaluator"]
             + [f"train.{k}" for k in _TRAIN_KEYS if k != "init_checkpoint"]
             + ([] if eval_only else ["dataloader.train", "optimizer", "lr_multiplier"]))
    check_training_settings(lazy_reader(cfg), LAZY_KEYS, eval_only=eval_only)
    # dataloader.shapes: only in configs that use the embedded demo dataset (configs/Demo),
    # dict(root=..., num_train=..., num_val=..., image_size=..., seed=...); never added.
    _check_shapes(cfg.dataloader.get("shapes"))
    for key, minimum in (("max_iter", 1), ("eval_period", 0), ("log_period", 1)):
        if not _is_int(cfg.train[key], minimum):
            raise ValueError(f"train.{key} must be an integer >= {minimum}, got "
                             f"{cfg.train[key]!r}")
    if not _is_int(cfg.train.checkpointer.get("period"), 1):
        raise ValueError(f"train.checkpointer.period must be an integer >= 1, got "
                         f"{cfg.train.checkpointer.get('period')!r}")


def _check_shapes(shapes) -> None:
    if shapes is None:
        return
    if not isinstance(shapes, DictConfig):
        raise ValueError(f"dataloader.shapes must be None or a dict of root, num_train, "
                         f"num_val, image_size, seed; got {shapes!r}")
    unknown = set(shapes) - {"root"} - {f for f, _ in _SHAPES_FIELDS}
    if unknown:
        raise ValueError(f"dataloader.shapes has unknown entries {sorted(unknown)}")
    root = shapes.get("root")
    if not isinstance(root, str) or not root:
        raise ValueError(f"dataloader.shapes.root must be a folder path, got {root!r}")
    for name, minimum in _SHAPES_FIELDS:
        if name in shapes and not _is_int(shapes[name], minimum):
            raise ValueError(f"dataloader.shapes.{name} must be an integer >= {minimum}, "
                             f"got {shapes[name]!r}")


# -- datasets and loaders ------------------------------------------------------------------------

def register_lazy_datasets(cfg: DictConfig) -> List[str]:
    """
    Generate (if missing) and register the shapes dataset ``dataloader.shapes`` describes, as
    ``shapes_train`` / ``shapes_val``, in every process (one writer per file system). A
    collective when several processes run.

    Returns:
        list[str]: the registered names (empty without ``dataloader.shapes``).
    """
    shapes = cfg.dataloader.get("shapes")
    if shapes is None:
        return []
    from ..data.shapes import register_shapes_dataset

    kwargs = {name: shapes[name] for name, _ in _SHAPES_FIELDS if name in shapes}
    return call_in_rank_order(lambda: register_shapes_dataset(shapes.root, **kwargs))


def _target(node) -> Any:
    target = node._target_
    return locate(target) if isinstance(target, str) else target


def _as_list(names) -> List[str]:
    return [names] if isinstance(names, str) else list(names)


def _named_dataset(node) -> Optional[DictConfig]:
    """The ``dataset`` node of a loader if it is Detectron2's ``get_detection_dataset_dicts``."""
    dataset = node.get("dataset") if isinstance(node, DictConfig) else None
    if isinstance(dataset, DictConfig) and "_target_" in dataset and \
            _target(dataset) is get_detection_dataset_dicts:
        return dataset
    return None


def validate_lazy_datasets(cfg: DictConfig, report_path: Optional[str] = None,
                           train: bool = True) -> DatasetCheck:
    """
    Validate the datasets ``dataloader.train`` (if ``train``) and ``dataloader.test`` name
    (``get_detection_dataset_dicts`` nodes, with their ``filter_empty``, ``min_keypoints``
    and ``proposal_files``) once, as the YAML trainer does (policy
    ``dataloader.invalid_records``; masks required when the train mapper loads them). A
    loader whose dataset is built otherwise is left as it is, with a warning.

    Raises:
        InvalidRecordsError: see :func:`fpn_plugin.data.build.check_datasets`.
    """
    train_node = _named_dataset(cfg.dataloader.train) if train else None
    test_node = _named_dataset(cfg.dataloader.test)
    unchecked = [name for name, node, used in (("train", train_node, train),
                                               ("test", test_node, True))
                 if used and node is None]
    for name in unchecked:
        logger.warning(f"dataloader.{name}.dataset is not Detectron2's "
                       "get_detection_dataset_dicts: its records are not validated")
    kwargs: Dict[str, Any] = {}
    if train_node is not None:
        mapper = cfg.dataloader.train.get("mapper")
        loads_masks = isinstance(mapper, DictConfig) and "_target_" in mapper and \
            _target(mapper) is DatasetMapper and bool(mapper.get("use_instance_mask", False))
        kwargs.update(require_segmentation=loads_masks,
                      filter_empty=train_node.get("filter_empty", True),
                      min_keypoints=train_node.get("min_keypoints", 0) or 0,
                      proposal_files_train=train_node.get("proposal_files"))
    if test_node is not None:
        kwargs["proposal_files_test"] = test_node.get("proposal_files")
    return check_datasets(
        _as_list(train_node.names) if train_node is not None else [],
        _as_list(test_node.names) if test_node is not None else [],
        policy=cfg.dataloader.invalid_records, check_images=cfg.dataloader.check_images,
        max_image_pixels=cfg.dataloader.max_image_pixels, report_path=report_path, **kwargs)


def _call(node: DictConfig, **given):
    """Detectron2's ``instantiate(node)`` with some arguments given as built objects."""
    kwargs = {k: instantiate(node[k]) for k in node if k != "_target_" and k not in given}
    return _target(node)(**kwargs, **given)


def _loader(cfg: DictConfig, name: str, records: Optional[List[Dict]]):
    node = cfg.dataloader[name]
    given: Dict[str, Any] = {}
    if records is not None:
        given["dataset"] = records
    if node.get("mapper") is not None:
        given["mapper"] = CheckedMapper(instantiate(node.mapper), cfg.dataloader.max_image_pixels)
    return _call(node, **given)


def build_lazy_train_loader(cfg: DictConfig, records: Optional[List[Dict]] = None):
    """``dataloader.train`` over ``records`` (validated ones) with checked image reads."""
    return _loader(cfg, "train", records)


def build_lazy_test_loader(cfg: DictConfig, records: Optional[List[Dict]] = None):
    """``dataloader.test`` over ``records`` (validated now when None) with checked image reads."""
    if records is None and _named_dataset(cfg.dataloader.test) is not None:
        check = validate_lazy_datasets(cfg, train=False)
        records = [r for rs in check.test_records.values() for r in rs]
    return _loader(cfg, "test", records)


def build_lazy_evaluator(cfg: DictConfig):
    """
    ``dataloader.evaluator``. Detectron2's ``COCOEvaluator`` gets ``use_fast_impl`` (its
    compiled COCOeval) only where the compiled ops exist, and writes its results under
    ``train.output_dir/inference/<dataset>`` unless the config says where.
    """
    node = cfg.dataloader.evaluator
    if not (isinstance(node, DictConfig) and "_target_" in node) or \
            _target(node) is not COCOEvaluator:
        return instantiate(node)
    from ..evaluation.coco import check_dataset_registered

    name = node.dataset_name
    check_dataset_registered(name)
    given: Dict[str, Any] = {}
    fast = node.get("use_fast_impl")
    if fast is None:
        given["use_fast_impl"] = has_compiled_ops()
    elif fast and not has_compiled_ops():
        raise ValueError("dataloader.evaluator.use_fast_impl=True needs Detectron2's compiled "
                         "ops (detectron2._C), which this installation lacks: remove the "
                         "setting (pycocotools' COCOeval gives the same numbers)")
    if node.get("output_dir") is None:
        given["output_dir"] = os.path.join(cfg.train.output_dir, "inference", safe_file_stem(name))
    return _call(node, **given)


# -- model and training loop ---------------------------------------------------------------------

def build_lazy_model(cfg: DictConfig) -> torch.nn.Module:
    """
    ``model`` instantiated on ``train.device``.

    Raises:
        ValueError: a component refuses its arguments (its message names them; a wrong
            argument name, which Python reports as a TypeError, included).
    """
    try:
        model = instantiate(cfg.model)
    except TypeError as e:  # an argument the class does not take, one missing
        raise ValueError(f"model: cannot be built from the config: {e}") from e
    model.to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    return model


def build_lazy_train_loop(cfg: DictConfig, model: torch.nn.Module, data_loader,
                          optimizer: torch.optim.Optimizer) -> SimpleTrainer:
    """
    The loop that runs the iterations: the model set up for ``train.amp`` /
    ``train.channels_last`` (the YAML entry's fast training path,
    :func:`fpn_plugin.engine.precision.build_train_loop`), DDP-wrapped when several processes
    run (``train.ddp``; CPU models with gloo too), in Detectron2's ``SimpleTrainer`` (the
    plugin's ``GradScalerTrainer`` for fp16). ``loop.model`` is the (wrapped) model.

    Args:
        model: the bare model, on ``train.device`` (the optimizer already holds its parameters).
    """
    return build_train_loop(model, data_loader, optimizer, precision=_training_precision(cfg),
                            channels_last=cfg.train.channels_last, ddp_kwargs=cfg.train.ddp)


def _training_precision(cfg: DictConfig) -> str:
    """"fp32", "bf16" or "fp16" for ``train.amp`` and ``train.channels_last`` on
    ``train.device`` (errors name those keys)."""
    return check_precision_settings(lazy_reader(cfg), LAZY_KEYS)


def _state_outside_loop(loop, optimizer) -> Dict[str, Any]:
    """Checkpointables that Detectron2 v0.6's loops leave out of their own state (main saves
    the optimizer and the grad scaler with the loop): without them --resume would restart
    momentum / Adam moments and the loss scale."""
    extra: Dict[str, Any] = {}
    if "state_dict" not in SimpleTrainer.__dict__:
        extra["optimizer"] = optimizer
    return extra  # the fp16 loop (GradScalerTrainer) saves its grad scaler itself


class LazyTrainer:
    """
    Trains the model of a LazyConfig as Detectron2's ``lazyconfig_train_net.py`` does (hooks:
    iteration timer, LR schedule ``lr_multiplier``, periodic checkpoints
    ``train.checkpointer``, evaluation every ``train.eval_period`` and at the end, metrics
    writers every ``train.log_period``), with the plugin's additions (module docstring). Use
    like the YAML trainer: ``LazyTrainer(cfg)``, ``resume_or_load(resume=...)``, ``train()``.

    Attributes:
        dataset_check (DatasetCheck): the validated records and every problem found.
        model: the model (DDP-wrapped with several processes).
        checkpointer (SafeDetectionCheckpointer): writes to ``train.output_dir``.
        start_iter (int): the first iteration (after ``resume_or_load``).
    """

    def __init__(self, cfg: DictConfig):
        check_lazy_training_config(cfg)
        self.cfg = cfg
        output_dir = cfg.train.output_dir
        self.dataset_check = prepare_output_and_check_datasets(
            output_dir, lambda report_path: validate_lazy_datasets(cfg, report_path=report_path))
        model = build_lazy_model(cfg)
        # The optimizer node's parameter groups read the model (Detectron2's convention).
        optimizer_cfg = copy.deepcopy(cfg.optimizer)
        optimizer_cfg.params.model = model
        self.optimizer = instantiate(optimizer_cfg)
        train_records = self.dataset_check.train_records if _named_dataset(
            cfg.dataloader.train) is not None else None
        data_loader = build_lazy_train_loader(cfg, train_records)
        self._loop = build_lazy_train_loop(cfg, model, data_loader, self.optimizer)
        self.model = self._loop.model
        self.checkpointer = SafeDetectionCheckpointer(
            self.model, output_dir, trainer=self._loop,
            **_state_outside_loop(self._loop, self.optimizer))
        self._loop.register_hooks(self.build_hooks())
        self.start_iter = 0

    def build_hooks(self) -> List[hooks.HookBase]:
        cfg, main = self.cfg, comm.is_main_process()
        ret = [InvalidRecordsMetric(self.dataset_check.num_skipped)]
        if cfg.train.divergence_factor:
            # Early, so that a diverged model is never checkpointed or evaluated.
            ret.append(DivergenceGuard(cfg.train.divergence_factor, cfg.optimizer.lr,
                                        keys=("train.divergence_factor", "optimizer.lr")))
        ret += [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer)
            if main else None,
            hooks.EvalHook(cfg.train.eval_period, self._test),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                                 period=cfg.train.log_period) if main else None,
        ]
        if main:
            # Last, so it runs after PeriodicWriter has flushed metrics.json in after_train.
            ret.append(TrainingCurve(cfg.train.output_dir))
        return [h for h in ret if h is not None]

    def _test(self):
        test_records = self.dataset_check.test_records
        records = [r for rs in test_records.values() for r in rs] if test_records else None
        return self.test(self.cfg, self.model, records)

    def resume_or_load(self, resume: bool = True) -> None:
        """
        With ``resume`` and a checkpoint in ``train.output_dir``: continue from it (model,
        optimizer, iteration, schedule); else load the weights ``train.init_checkpoint``.
        Then every rank must start at the same iteration (checked).
        """
        self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            # The checkpoint holds the iteration that had just finished.
            self.start_iter = self._loop.iter + 1
        else:
            self.start_iter = 0
        check_started_alike(self.start_iter, self.cfg.train.output_dir, "train.output_dir")

    def train(self) -> None:
        """Iterations ``start_iter`` to ``train.max_iter``; a diverging run ends with its
        message (naming ``optimizer.lr``), no traceback."""
        with divergence_reported("optimizer.lr", self.cfg.optimizer.lr):
            self._loop.train(self.start_iter, self.cfg.train.max_iter)

    @staticmethod
    def test(cfg: DictConfig, model, records: Optional[List[Dict]] = None) -> Dict:
        """
        Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator`` (every process
        its share; results on the main process).

        Args:
            records: validated records of the test set (validated now when None).
        """
        loader = build_lazy_test_loader(cfg, records)
        results = inference_on_dataset(model, loader, build_lazy_evaluator(cfg))
        if comm.is_main_process() and results:
            print_csv_format(results)
        return results
