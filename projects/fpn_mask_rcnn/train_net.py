#!/usr/bin/env python
"""
Train or evaluate a Mask R-CNN built from fpn_plugin's components (Detectron2 conventions).

    # COCO on 8 GPUs (datasets under $DETECTRON2_DATASETS/coco, see docs/training.md)
    python projects/fpn_mask_rcnn/train_net.py --num-gpus 8 \
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml
    # continue after an interruption (last_checkpoint in OUTPUT_DIR)
    python projects/fpn_mask_rcnn/train_net.py --num-gpus 8 --resume --config-file ...
    # evaluate a checkpoint (Detectron2's own FPN checkpoints load too)
    python projects/fpn_mask_rcnn/train_net.py --eval-only --config-file ... MODEL.WEIGHTS model.pth

    # two machines with 8 GPUs each: the same command on both, --machine-rank 0 and 1
    python projects/fpn_mask_rcnn/train_net.py --num-gpus 8 --num-machines 2 --machine-rank 0 \
        --dist-url tcp://MACHINE0:29500 --config-file ...
    # or started by torchrun (one process per GPU; leave --num-gpus at 1)
    torchrun --nproc-per-node 8 projects/fpn_mask_rcnn/train_net.py --config-file ...

Arguments are Detectron2's ``default_argument_parser``: --config-file, --resume, --eval-only,
--num-gpus, --num-machines, --machine-rank, --dist-url, and trailing KEY VALUE overrides.
Without CUDA, --num-gpus N starts N CPU processes (gloo backend), see docs/training.md.
Configs naming the embedded shapes dataset (``shapes_train``/``shapes_val``) get it generated
and registered first (where: ``DATASETS.SHAPES.ROOT``).

Weights (``MODEL.WEIGHTS``, ``--resume``, ``--eval-only``) are read by
``fpn_plugin.checkpoint.SafeDetectionCheckpointer``: nothing in a weights file can run code.
A bad config value, dataset record, image or checkpoint, and a diverging run, end with exit
status 2 and one ``error: ...`` line naming the key, file or id (no traceback).

A thin wrapper over the package's entry, ``python -m fpn_plugin.train`` (``fpn_plugin/train.py``),
which takes LazyConfigs too.
"""
import fpn_plugin  # noqa: F401  (registers the plugin's components)
from fpn_plugin.train import cli
from fpn_plugin.train import train_yaml as main  # noqa: F401  (one process of a run)

if __name__ == "__main__":
    cli(kind="yaml")
