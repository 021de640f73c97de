"""
The plugin's training entry: ``python -m fpn_plugin.train --config-file CONFIG [flags]
[overrides]`` trains (or, with ``--eval-only``, evaluates) a model from a YAML config
(Detectron2's ``CfgNode`` files, trailing ``KEY VALUE`` overrides) or a LazyConfig (a ``.py``
file, or a plain ``.yaml`` saved by ``LazyConfig.save``; trailing ``key=value`` overrides).

    # COCO on 8 GPUs (datasets under $DETECTRON2_DATASETS/coco, see docs/training.md)
    python -m fpn_plugin.train --num-gpus 8 \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml
    # a LazyConfig recipe
    python -m fpn_plugin.train --num-gpus 8 \\
        --config-file configs/new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py
    # continue after an interruption; evaluate a checkpoint
    python -m fpn_plugin.train --resume --config-file ...
    python -m fpn_plugin.train --eval-only --config-file ... MODEL.WEIGHTS model.pth
    # two machines: the same command on both, --machine-rank 0 and 1
    python -m fpn_plugin.train --num-gpus 8 --num-machines 2 --machine-rank 0 \\
        --dist-url tcp://MACHINE0:29500 --config-file ...
    # started by torchrun (one process per GPU; leave --num-gpus at 1)
    torchrun --nproc-per-node 8 -m fpn_plugin.train --config-file ...

The flags are Detectron2's ``default_argument_parser``'s. Without CUDA, ``--num-gpus N``
starts N CPU processes (gloo). Bad input (flag, config value or override, dataset record,
image, checkpoint) and a diverging run end with exit status 2 and one ``error: ...`` line
naming the flag, key, file or id, without a traceback. ``projects/fpn_mask_rcnn/train_net.py``
(YAML) and ``lazy_train_net.py`` (LazyConfig) are thin wrappers over this module.

:func:`resolve_config_file` is the one place that decides what ``--config-file`` names.
"""
import argparse
import os
import sys
from typing import Callable, NamedTuple, Optional, Sequence

__all__ = ["CONFIG_KINDS", "ConfigFile", "build_parser", "cli", "main", "resolve_config_file",
           "train_lazy", "train_yaml"]

CONFIG_KINDS = ("yaml", "lazy")
# Top-level entries of a LazyConfig (Detectron2's common/*.py); a YAML config's are upper case.
_LAZY_ROOTS = ("model", "train", "dataloader", "optimizer", "lr_multiplier")


class ConfigFile(NamedTuple):
    """What ``--config-file`` names: a local ``path`` and its ``kind`` ("yaml" or "lazy")."""

    path: str
    kind: str


def resolve_config_file(config_file: str) -> ConfigFile:
    """
    The file ``--config-file`` names and its kind. A name that is no file here but one of
    the plugin's configs (``fpn_plugin.model_zoo``, e.g.
    ``COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml``) is that config's path in
    the installed package. A ``.py`` file is a LazyConfig; a YAML file
    is a LazyConfig when its top-level entries are a LazyConfig's (``model``, ``train``,
    ``dataloader``, ...; also when it is not plain YAML, so that the LazyConfig loader refuses
    it with its message), else a Detectron2 YAML config. A missing file is left to the
    loader of its kind, which names it.
    """
    if not os.path.exists(config_file):
        config_file = _model_zoo_file(config_file)
    ext = os.path.splitext(config_file)[1].lower()
    if ext == ".py":
        return ConfigFile(config_file, "lazy")
    if ext in (".yaml", ".yml") and os.path.isfile(config_file) and _is_lazy_yaml(config_file):
        return ConfigFile(config_file, "lazy")
    return ConfigFile(config_file, "yaml")


def _model_zoo_file(name: str) -> str:
    """The model-zoo config ``name`` names, else ``name`` (the loader then reports the missing
    file; with the model zoo's close names, if it has any)."""
    from .model_zoo import get_config_file

    try:
        return get_config_file(name)
    except ValueError:  # not a model-zoo name (an absolute path, another suffix)
        return name
    except FileNotFoundError as e:
        if "did you mean" not in str(e):
            return name
        hint = str(e)[str(e).index("did you mean"):]
        raise FileNotFoundError(f"config file not found: {name!r} (not a file, nor one of "
                                f"fpn_plugin's model-zoo configs; {hint})") from e


def _is_lazy_yaml(path: str) -> bool:
    from .io.config_files import ConfigFileError, safe_load_yaml_file

    try:
        content = safe_load_yaml_file(path)
    except ConfigFileError:
        return True  # not plain YAML: the LazyConfig loader refuses it, naming the file
    return isinstance(content, dict) and any(key in content for key in _LAZY_ROOTS)


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` with this entry's name and description."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog=__doc__.split("\n\n")[1])
    parser.prog = "python -m fpn_plugin.train"
    parser.description = ("Train or evaluate a Detectron2 model with fpn_plugin's components "
                          "from a YAML config or a LazyConfig (.py, or .yaml saved by "
                          "LazyConfig.save).")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--allow-target-prefix", action="append", default=[], metavar="MODULE",
                        help="also allow a .yaml LazyConfig's _target_ under MODULE (repeatable; "
                             "default: detectron2, fpn_plugin, torch, torchvision, fvcore)")
    return parser


# Problems with what the user gave (config, data, checkpoint) before training starts.
def _start_errors():
    from .checkpoint import CheckpointError

    return ValueError, FileNotFoundError, CheckpointError


# Problems that can only show during training: a diverging run, an image found bad late.
def _training_errors():
    from .checkpoint import CheckpointError
    from .data.images import ImageFileError

    return FloatingPointError, ImageFileError, CheckpointError


def _register_yaml_datasets(cfg) -> None:
    """Register the embedded shapes dataset when the config uses it (generated if missing)."""
    names = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if not any(n.startswith("shapes_") for n in names):
        return
    from .data.shapes import register_shapes_from_config
    from .engine.launch import call_in_rank_order

    # Generated once per file system (rank 0, then each other machine), registered everywhere.
    call_in_rank_order(lambda: register_shapes_from_config(cfg))


class _Entry(NamedTuple):
    """What differs between the YAML and the LazyConfig entry (each a function of the config,
    imported when a run starts)."""

    setup: Callable  # args -> config: loaded, checked, logs set up, datasets registered
    trainer: Callable  # config -> trainer
    build_model: Callable  # config -> model (--eval-only)
    weights: Callable  # config -> (weights to load, checkpoint folder)
    evaluate: Callable  # (config, model) -> results


def _run(entry: _Entry, args):
    from .checkpoint import SafeDetectionCheckpointer
    from .utils.cli import exit_on_errors

    with exit_on_errors(*_start_errors()):
        cfg = entry.setup(args)
        if args.eval_only:
            model = entry.build_model(cfg)
            weights, output_dir = entry.weights(cfg)
            # Strict: an empty or partial checkpoint would evaluate a random model
            # (``MODEL.WEIGHTS model.pth?strict=False`` relaxes it on purpose).
            SafeDetectionCheckpointer(model, save_dir=output_dir, strict=True).resume_or_load(
                weights, resume=args.resume)
        else:
            trainer = entry.trainer(cfg)
            trainer.resume_or_load(resume=args.resume)  # checks that every rank resumed alike
    with exit_on_errors(*_training_errors()):
        return entry.evaluate(cfg, model) if args.eval_only else trainer.train()


def _setup_yaml(args):
    from .config import load_config
    from .engine.setup import default_setup

    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    _register_yaml_datasets(cfg)
    return cfg


def _evaluate_yaml(cfg, model):
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm

    from .engine import Trainer

    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
    return results


def train_yaml(args):
    """One process of a YAML-config run (``args`` from :func:`build_parser`)."""
    from .engine import Trainer

    return _run(_Entry(_setup_yaml, Trainer, Trainer.build_model,
                       lambda cfg: (cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR), _evaluate_yaml), args)


def _setup_lazy(args):
    from .engine.lazy import check_lazy_training_config, load_lazy_config, register_lazy_datasets
    from .engine.setup import default_setup

    cfg = load_lazy_config(args.config_file, args.opts, getattr(args, "allow_target_prefix", ()))
    check_lazy_training_config(cfg, eval_only=args.eval_only)
    default_setup(cfg, args)  # log files, config.yaml in train.output_dir, seed
    register_lazy_datasets(cfg)
    return cfg


def train_lazy(args):
    """One process of a LazyConfig run (``args`` from :func:`build_parser`)."""
    from .engine.lazy import LazyTrainer, build_lazy_model

    return _run(_Entry(_setup_lazy, LazyTrainer, build_lazy_model,
                       lambda cfg: (cfg.train.init_checkpoint, cfg.train.output_dir),
                       LazyTrainer.test), args)


_ENTRIES = {"yaml": train_yaml, "lazy": train_lazy}


def main(args):
    """One process of a run: the YAML or the LazyConfig entry, by ``--config-file``'s kind."""
    config = resolve_config_file(args.config_file)
    args.config_file = config.path  # a model-zoo name becomes its file
    return _ENTRIES[config.kind](args)


def cli(argv: Optional[Sequence[str]] = None, kind: Optional[str] = None) -> None:
    """
    The command line: parse ``argv`` (default ``sys.argv[1:]``), check the launch flags, start
    the processes (:func:`fpn_plugin.engine.launch.launch_entry`) and run the entry of
    ``kind`` ("yaml", "lazy"; None: by the config file) in each.
    """
    from .engine.launch import check_launch_args, launch_entry
    from .utils.cli import EXIT_INTERRUPTED, exit_on_errors, quiet_third_party_noise

    quiet_third_party_noise()
    args = build_parser().parse_args(argv)
    with exit_on_errors(ValueError, FileNotFoundError):
        check_launch_args(args.num_gpus, args.num_machines, args.machine_rank)
        args.config_file = resolve_config_file(args.config_file).path
    print("Command Line Args:", args)
    try:
        launch_entry(main if kind is None else _ENTRIES[kind], args)
    except KeyboardInterrupt:  # Ctrl-C: one line and 130, as the export and deploy commands
        print("interrupted: training stopped; --resume continues from the last checkpoint in "
              "OUTPUT_DIR", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    # Through the package's module (not __main__), so that launch's worker processes find the
    # entry functions by their importable name.
    from fpn_plugin.train import cli as _cli

    _cli()
