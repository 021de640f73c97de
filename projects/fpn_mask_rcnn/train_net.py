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
"""
import fpn_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.engine import Trainer
from fpn_plugin.engine.ddp import check_resumed_alike
from fpn_plugin.engine.launch import launch, launch_from_env, started_by_torchrun

def setup(args):
    """Config from the file and overrides, frozen; plus Detectron2's default_setup."""
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def register_datasets(cfg):
    """Register the embedded shapes dataset when the config uses it (generated if missing)."""
    names = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    if not any(n.startswith("shapes_") for n in names):
        return
    from fpn_plugin.data.shapes import register_shapes_from_config

    # Rank 0 generates; then the first process of every other machine, which finds the files
    # on shared storage or writes its own copy (the dataset is a pure function of its keys);
    # then everyone else registers them. Never two writers on one file system at once.
    if comm.is_main_process():
        register_shapes_from_config(cfg)
    comm.synchronize()
    if comm.get_local_rank() == 0 and not comm.is_main_process():
        register_shapes_from_config(cfg)
    comm.synchronize()
    if comm.get_local_rank() != 0:
        register_shapes_from_config(cfg)


def main(args):
    cfg = setup(args)
    register_datasets(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    check_resumed_alike(trainer)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    if started_by_torchrun():  # torchrun started the processes: join them, spawn nothing
        if args.num_gpus != 1 or args.num_machines != 1:
            raise SystemExit("under torchrun, leave --num-gpus/--num-machines at 1: torchrun's "
                             "--nproc-per-node/--nnodes set the processes")
        launch_from_env(main, args=(args,))
    else:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
