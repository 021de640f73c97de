"""
The multi-process job of tests/engine/test_distributed.py, started like train_net.py starts
training: ``fpn_plugin.engine.launch`` with N processes (gloo on CPU), Detectron2's trainer,
evaluator and DDP inside.

    python tests/engine/distributed_jobs.py --num-procs N --data DIR --out DIR [--families a,b]

In every process, in this order:

1. Evaluation: a seeded tiny Mask R-CNN (identical in every job) evaluated on the shapes val
   split with ``Trainer.test`` (InferenceSampler + COCOEvaluator gathering to rank 0). Its
   predictions then become ground truth ("self-GT": the 1st, 3rd and 5th best detections of
   every image), so a second evaluation has a far-from-zero AP that drops if an image is lost
   or duplicated. Rank 0 writes ``eval/`` (predictions, self-GT json, AP).
2. Training, per variant family (``parity_nms_topk``: with NMS and top-k cutting): ``Trainer`` (DDP with Detectron2's settings, so
   ``find_unused_parameters=False``) for ``MAX_ITER`` iterations on a two-image dataset with
   SOLVER.IMS_PER_BATCH 2: every iteration's global batch is both images, whether one process
   holds both or each of two processes holds one. Every rank writes its final weights
   (``final_rank<r>.pth``) and what it saw (``seen_rank<r>.json``: image ids, proposals;
   see ``_Recorder``), rank 0 the initial weights and the losses of every iteration.

``base_cfg`` explains why the two set-ups then compute the same update (up to float32
rounding).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.layers import Conv2d  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, Backbone  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from fvcore.nn import weight_init  # noqa: E402
from model_testutils import tiny_mask_rcnn_cfg  # noqa: E402

import fpn_plugin  # noqa: E402,F401  (registers the components)
from fpn_plugin.engine import Trainer  # noqa: E402
from fpn_plugin.engine.launch import launch  # noqa: E402

SEED = 7
MAX_ITER = 3
NMS_TOPK_THRESH, NMS_TOPK_PRE, NMS_TOPK_POST = 0.7, 100, 50
NORM_KEYS = ("MODEL.FPN.NORM", "MODEL.RPN.HEAD_NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM")
# Variant families (config overrides on the parity model). "sync_bn" uses Detectron2's
# NaiveSyncBatchNorm: torch's nn.SyncBatchNorm ("SyncBN") synchronizes CUDA tensors only.
FAMILIES = {
    "parity": [],
    "panet_path": ["MODEL.FPN.BOTTOM_UP_PATH", True],
    "weighted_fusion": ["MODEL.FPN.FUSE_TYPE", "weighted"],
    "unshared_rpn_per_level_anchors": [
        "MODEL.RPN.SHARED_HEAD", False,
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
        [[0.5, 1.0, 2.0]] * 4 + [[0.25, 0.5, 1.0, 2.0, 4.0]],
    ],
    "gn_rpn_per_level_topk": [
        "MODEL.RPN.CONV_DIMS", [-1, -1], "MODEL.RPN.HEAD_NORM", "GN",
        # Each level's anchor count at 64 px: the per-level path runs without a cut.
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN_PER_LEVEL", [768, 192, 48, 12, 3],
        "MODEL.RPN.POST_NMS_TOPK_MODE", "per_level",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN_PER_LEVEL", [768, 192, 48, 12, 3],
    ],
    "panet_mask_head": ["MODEL.ROI_MASK_HEAD.NAME", "PANetMaskHead",
                        "MODEL.ROI_MASK_HEAD.POOLER_TYPE", ""],
    "sync_bn": [item for key in NORM_KEYS for item in (key, "naiveSyncBN")]
               + ["MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16],
    # The proposal stage as trained in practice: the top 100 anchors of each level (P2 has
    # 768, P3 192) go to NMS at 0.7, then the best 50 of each image are kept. The ROI heads
    # still sample every proposal, and every image keeps exactly 50 (+ its ground-truth box),
    # so the 2-image loss is still the mean of the 1-image losses (base_cfg); the job records
    # the per-image counts and the test checks that precondition instead of assuming it.
    "parity_nms_topk": ["MODEL.RPN.NMS_THRESH", NMS_TOPK_THRESH,
                        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", NMS_TOPK_PRE,
                        "MODEL.RPN.POST_NMS_TOPK_TRAIN", NMS_TOPK_POST],
}


class DistTestConvNet(Backbone):
    """
    Four stride-2 3x3 convs + ReLU after a stride-2 stem: outputs "res2".."res5" at strides
    4..32 with 16, 32, 64, 64 channels. The bottom-up part is not under test; without
    normalization it has no batch statistics, which a ResNet trained from scratch at 64 px
    would compute over 2x2 maps (its BN makes the gradients chaotic: a 1e-6 weight change
    moves them by percents, so no two runs could agree after a few steps).
    """

    def __init__(self, in_channels=3):
        super().__init__()
        chans = [in_channels, 16, 16, 32, 64, 64]
        self.convs = nn.ModuleList(
            Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, activation=F.relu)
            for i in range(5))
        for conv in self.convs:
            weight_init.c2_msra_fill(conv)
        self._names = ["res2", "res3", "res4", "res5"]
        self._out_feature_channels = dict(zip(self._names, chans[2:]))
        self._out_feature_strides = {n: 2 ** (i + 2) for i, n in enumerate(self._names)}
        self._out_features = list(self._names)

    def forward(self, x):
        outputs = {}
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i >= 1:
                outputs[self._names[i - 1]] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_dist_test_conv_net(cfg, input_shape):
    return DistTestConvNet(input_shape.channels)


def base_cfg(data_dir, out_dir):
    """The tiny plugin Mask R-CNN on DistTestConvNet, 64 px images, CPU."""
    cfg = tiny_mask_rcnn_cfg(num_classes=4, components="plugin")
    cfg.MODEL.BACKBONE.NAME = "build_custom_fpn_backbone"
    cfg.MODEL.FPN.BOTTOM_UP_BACKBONE = "build_dist_test_conv_net"
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]  # unit-scale inputs for the fresh convs
    cfg.MODEL.FPN.OUT_CHANNELS = 64  # GN's 32 groups need 2+ values each on the 1x1 P6
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.INPUT.RANDOM_FLIP = "none"
    # Why 2 processes x 1 image equal 1 process x 2 images here. DDP averages the processes'
    # gradients, so the update is the same iff the 2-image loss is the mean of the two
    # 1-image losses. The RPN losses are sums divided by BATCH_SIZE_PER_IMAGE x images: always
    # a mean. The ROI losses are means over the batch's ROIs (box and class) and foreground
    # ROIs (mask): a mean of per-image means only when every image has as many of each. And
    # nothing random or order-dependent may pick what is trained on, since each process has
    # its own RNG and float32 rounding differs between a batch of 1 and of 2. So: every
    # labelled anchor (1023 at 64 px) is sampled; every anchor's box becomes a proposal (no
    # NMS, no top-k cut at a near-tie); every proposal is sampled; only the ground-truth
    # boxes are foreground (IoU >= 0.99), and the dataset has one object per image. Then every
    # image brings 1024 ROIs and 1 mask ROI wherever it is. Norms with batch statistics see
    # the global batch through naiveSyncBN (sync_bn family); no other layer has any.
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 2048
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2048
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2048
    cfg.MODEL.RPN.NMS_THRESH = 1.0
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 4096
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0
    cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.99]
    cfg.SOLVER.IMS_PER_BATCH = 2  # global batch, divided among the processes
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.MAX_ITER = MAX_ITER
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATASETS.TRAIN = ("dist_train",)
    cfg.DATASETS.TEST = ()
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = out_dir
    return cfg


def _register(data_dir):
    if "dist_train" not in DatasetCatalog.list():
        register_coco_instances("dist_train", {}, os.path.join(data_dir, "train.json"),
                                os.path.join(data_dir, "train"))
        register_coco_instances("dist_val", {}, os.path.join(data_dir, "val.json"),
                                os.path.join(data_dir, "val"))


def _self_gt(predictions, val_json, path):
    """COCO json of val's images whose objects are the 1st, 3rd and 5th best detections."""
    import pycocotools.mask as mask_util

    with open(val_json) as f:
        data = json.load(f)
    # COCOEvaluator's saved predictions hold contiguous class indices; the json, dataset ids.
    to_dataset_id = {v: k for k, v in
                     MetadataCatalog.get("dist_val").thing_dataset_id_to_contiguous_id.items()}
    annotations = []
    for pred in sorted(predictions, key=lambda p: p["image_id"]):
        ranked = sorted(pred["instances"], key=lambda d: -d["score"])
        for det in ranked[0:6:2]:
            rle = dict(det["segmentation"])
            annotations.append({
                "id": len(annotations) + 1, "image_id": pred["image_id"],
                "category_id": to_dataset_id[det["category_id"]], "bbox": det["bbox"],
                "segmentation": rle, "area": float(mask_util.area(rle)), "iscrowd": 0})
    data["annotations"] = annotations
    with open(path, "w") as f:
        json.dump(data, f)


def _evaluate(cfg, model, name):
    """Trainer.test on one dataset; returns (results on rank 0 else {}, predictions path)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (name,)
    results = Trainer.test(cfg, model)
    return results, os.path.join(cfg.OUTPUT_DIR, "inference", name, "instances_predictions.pth")


def run_evaluation(data_dir, out_dir):
    eval_dir = os.path.join(out_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    cfg = base_cfg(data_dir, eval_dir)
    seed_all_rng(SEED)
    model = Trainer.build_model(cfg)
    results, pred_path = _evaluate(cfg, model, "dist_val")
    selfgt_json = os.path.join(eval_dir, "self_gt.json")
    if comm.is_main_process():
        _self_gt(torch.load(pred_path, weights_only=True), os.path.join(data_dir, "val.json"),
                 selfgt_json)
    comm.synchronize()
    register_coco_instances("dist_selfgt", {}, selfgt_json, os.path.join(data_dir, "val"))
    selfgt_results, selfgt_pred_path = _evaluate(cfg, model, "dist_selfgt")
    if comm.is_main_process():
        with open(os.path.join(eval_dir, "results.json"), "w") as f:
            json.dump({"shapes_gt": results, "self_gt": selfgt_results,
                       "predictions": pred_path, "self_gt_predictions": selfgt_pred_path}, f)


class _LossLog(HookBase):
    """Rank 0 records every iteration's losses, averaged over the ranks by Detectron2."""

    def __init__(self, path):
        self._path, self._rows = path, []

    def after_step(self):
        if comm.is_main_process():
            storage = self.trainer.storage
            self._rows.append({k: storage.history(k).latest() for k in storage.histories()
                               if k.startswith("loss") or k == "total_loss"})

    def after_train(self):
        if comm.is_main_process():
            with open(self._path, "w") as f:
                json.dump(self._rows, f)


class _Recorder:
    """What each rank's model sees in training, written to ``seen_rank<r>.json``: the image ids
    of every iteration's local batch, the number of proposals of each image and the largest
    IoU between two of them (``max_proposal_iou``). In a one-process job it also keeps every
    batch-norm call's per-channel biased batch variance and element count (``bn_calls.pth``),
    from which the test derives what synchronized BN must track."""

    def __init__(self, model):
        self.image_ids, self.proposals, self.max_iou, self.bn_calls = [], [], [], {}
        model.register_forward_pre_hook(self._batch)
        model.proposal_generator.register_forward_hook(self._proposals)
        if comm.get_world_size() == 1:
            for name, module in model.named_modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.register_forward_pre_hook(self._bn(name))

    def _batch(self, module, args):
        if module.training:
            self.image_ids.append([d["image_id"] for d in args[0]])

    def _proposals(self, module, args, output):
        from detectron2.structures import pairwise_iou

        if module.training:
            proposals = output[0]
            self.proposals.append([len(p) for p in proposals])
            ious = []
            for p in proposals:
                iou = pairwise_iou(p.proposal_boxes, p.proposal_boxes)
                iou.fill_diagonal_(0)
                ious.append(float(iou.max()) if len(p) > 1 else 0.0)
            self.max_iou.append(ious)

    def _bn(self, name):
        def hook(module, args):
            if module.training:
                x = args[0].detach().double()
                var = x.var(dim=(0, 2, 3), unbiased=False)
                self.bn_calls.setdefault(name, []).append((x.numel() // x.shape[1], var))
        return hook

    def write(self, fam_dir):
        rank = comm.get_rank()
        with open(os.path.join(fam_dir, f"seen_rank{rank}.json"), "w") as f:
            json.dump({"image_ids": self.image_ids, "proposals_per_image": self.proposals,
                       "max_proposal_iou": self.max_iou}, f)
        if self.bn_calls:
            torch.save(self.bn_calls, os.path.join(fam_dir, "bn_calls.pth"))


def run_family(name, data_dir, out_dir):
    fam_dir = os.path.join(out_dir, name)
    os.makedirs(fam_dir, exist_ok=True)
    cfg = base_cfg(data_dir, fam_dir)
    cfg.merge_from_list(FAMILIES[name])
    seed_all_rng(SEED)  # the same initial weights in every process and job
    trainer = Trainer(cfg)
    model = trainer.model.module if comm.get_world_size() > 1 else trainer.model
    if comm.is_main_process():
        torch.save(model.state_dict(), os.path.join(fam_dir, "initial.pth"))
    trainer.register_hooks([_LossLog(os.path.join(fam_dir, "losses.json"))])
    recorder = _Recorder(model)
    trainer.resume_or_load(resume=False)
    trainer.train()
    recorder.write(fam_dir)
    torch.save(model.state_dict(), os.path.join(fam_dir, f"final_rank{comm.get_rank()}.pth"))
    comm.synchronize()


def job(num_procs, data_dir, out_dir, families, evaluate):
    torch.set_num_threads(1)
    setup_logger(os.path.join(out_dir, "log.txt"), distributed_rank=comm.get_rank())
    setup_logger(os.path.join(out_dir, "log.txt"), distributed_rank=comm.get_rank(),
                 name="fpn_plugin")
    assert comm.get_world_size() == num_procs, (comm.get_world_size(), num_procs)
    _register(data_dir)
    if evaluate:
        run_evaluation(data_dir, out_dir)
    for name in families:
        run_family(name, data_dir, out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-procs", type=int, required=True)
    parser.add_argument("--data", required=True, help="shapes dataset root (train.json, val.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    os.makedirs(args.out, exist_ok=True)
    launch(job, args.num_procs, dist_url="auto",
           args=(args.num_procs, args.data, args.out, families, not args.no_eval))


if __name__ == "__main__":
    main()
