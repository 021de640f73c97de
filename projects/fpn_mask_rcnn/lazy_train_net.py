#!/usr/bin/env python
"""
Train or evaluate a model described by a Python config (Detectron2's LazyConfig), as
Detectron2's ``tools/lazyconfig_train_net.py`` does, with the plugin's checks.

    # Detectron2's new baseline R50 100ep LSJ with the plugin's components, 8 GPUs
    python projects/fpn_mask_rcnn/lazy_train_net.py --num-gpus 8 \
        --config-file configs/new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py
    # continue after an interruption (last_checkpoint in train.output_dir)
    python projects/fpn_mask_rcnn/lazy_train_net.py --num-gpus 8 --resume --config-file ...
    # evaluate a checkpoint
    python projects/fpn_mask_rcnn/lazy_train_net.py --eval-only --config-file ... \
        train.init_checkpoint=model.pth
    # the CPU demo as a LazyConfig
    python projects/fpn_mask_rcnn/lazy_train_net.py \
        --config-file configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.py
    # started by torchrun (one process per GPU; leave --num-gpus at 1)
    torchrun --nproc-per-node 8 projects/fpn_mask_rcnn/lazy_train_net.py --config-file ...

Arguments are Detectron2's ``default_argument_parser``: --config-file (a .py LazyConfig, or a
plain .yaml saved by LazyConfig.save), --resume, --eval-only, --num-gpus, --num-machines,
--machine-rank, --dist-url, and trailing ``key=value`` overrides (``train.max_iter=1000``,
``optimizer.lr=0.05``, ``train.amp.enabled=False``). Without CUDA, --num-gpus N starts N CPU
processes (gloo), and configs made for GPUs need ``train.device=cpu train.amp.enabled=False``.

What it adds to Detectron2's script (fpn_plugin.engine.lazy): the plugin's training settings
(``dataloader.invalid_records``, ``dataloader.check_images``, ``dataloader.max_image_pixels``,
``dataloader.shapes``, ``train.divergence_factor``) with their defaults; datasets validated
before training; COCO evaluation without compiled ops; checkpoints read and written by
``fpn_plugin.checkpoint.SafeDetectionCheckpointer`` (nothing in a weights file runs code);
``training_curve.png``. Bad input (config file or override, dataset record, image, checkpoint)
and a diverging run end with exit status 2 and one ``error: ...`` line.
"""
import fpn_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.engine import default_argument_parser

from fpn_plugin.checkpoint import CheckpointError, SafeDetectionCheckpointer
from fpn_plugin.data.images import ImageFileError
from fpn_plugin.engine.lazy import (
    LazyTrainer,
    build_lazy_model,
    check_lazy_training_config,
    load_lazy_config,
    register_lazy_datasets,
)
from fpn_plugin.engine.launch import launch_entry
from fpn_plugin.engine.setup import default_setup
from fpn_plugin.utils.cli import exit_on_errors, quiet_third_party_noise

# Problems with what the user gave (config, data, checkpoint) before training starts.
START_ERRORS = (ValueError, FileNotFoundError, CheckpointError)
# Problems that can only show during training: a diverging run, an image found bad late.
TRAINING_ERRORS = (FloatingPointError, ImageFileError, CheckpointError)


def setup(args):
    """The config from the file and overrides, checked; plus Detectron2's default_setup (log
    files, ``config.yaml`` in ``train.output_dir``, seed ``train.seed``)."""
    cfg = load_lazy_config(args.config_file, args.opts, getattr(args, "allow_target_prefix", ()))
    check_lazy_training_config(cfg, eval_only=args.eval_only)
    default_setup(cfg, args)
    return cfg


def main(args):
    with exit_on_errors(*START_ERRORS):
        cfg = setup(args)
        register_lazy_datasets(cfg)
        if args.eval_only:
            model = build_lazy_model(cfg)
            SafeDetectionCheckpointer(model, cfg.train.output_dir, strict=True).resume_or_load(
                cfg.train.init_checkpoint, resume=args.resume)
        else:
            trainer = LazyTrainer(cfg)
            trainer.resume_or_load(resume=args.resume)
    with exit_on_errors(*TRAINING_ERRORS):
        if args.eval_only:
            return LazyTrainer.test(cfg, model)
        return trainer.train()


if __name__ == "__main__":
    quiet_third_party_noise()
    parser = default_argument_parser()
    parser.add_argument("--allow-target-prefix", action="append", default=[], metavar="MODULE",
                        help="also allow a .yaml config's _target_ under MODULE (repeatable)")
    args = parser.parse_args()
    print("Command Line Args:", args)
    launch_entry(main, args)
