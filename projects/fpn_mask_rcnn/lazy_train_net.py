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

A thin wrapper over the package's entry, ``python -m fpn_plugin.train`` (``fpn_plugin/train.py``).
"""
import fpn_plugin  # noqa: F401  (registers the plugin's components)
from fpn_plugin.train import cli
from fpn_plugin.train import train_lazy as main  # noqa: F401  (one process of a run)

if __name__ == "__main__":
    cli(kind="lazy")
