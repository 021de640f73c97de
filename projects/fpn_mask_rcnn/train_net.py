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
"""
import fpn_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from fpn_plugin.checkpoint import CheckpointError, SafeDetectionCheckpointer
from fpn_plugin.config import load_config
from fpn_plugin.data.images import ImageFileError
from fpn_plugin.engine import Trainer
from fpn_plugin.engine.launch import call_in_rank_order, launch_entry
from fpn_plugin.engine.setup import default_setup
from fpn_plugin.utils.cli import exit_on_errors, quiet_third_party_noise

# Problems with what the user gave (config, data, checkpoint) before training starts.
START_ERRORS = (ValueError, FileNotFoundError, CheckpointError)
# Problems that can only show during training: a diverging run, an image found bad late.
TRAINING_ERRORS = (FloatingPointError, ImageFileError, CheckpointError)


def setup(args):
    """Config from the file and overrides, frozen; plus Detectron2's default_setup."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def register_datasets(cfg):
    """Register the embedded shapes dataset when the config uses it (generated if missing)."""
    names = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if not any(n.startswith("shapes_") for n in names):
        return
    from fpn_plugin.data.shapes import register_shapes_from_config

    # Generated once per file system (rank 0, then each other machine), registered everywhere.
    call_in_rank_order(lambda: register_shapes_from_config(cfg))


def main(args):
    with exit_on_errors(*START_ERRORS):
        cfg = setup(args)
        register_datasets(cfg)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        else:
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=args.resume)  # checks that every rank resumed alike
    with exit_on_errors(*TRAINING_ERRORS):
        if args.eval_only:
            res = Trainer.test(cfg, model)
            if comm.is_main_process():
                verify_results(cfg, res)
            return res
        return trainer.train()


if __name__ == "__main__":
    quiet_third_party_noise()
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_entry(main, args)
