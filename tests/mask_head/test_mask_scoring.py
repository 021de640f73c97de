"""
MaskScoringHead (fpn_plugin.mask_head.mask_scoring): plain-head checkpoints load with only the
MaskIoU branch missing and give the same logits and mask loss; the IoU targets and the mask
rescoring on hand-made cases; the L2 loss; gradients reach every new parameter (and the IoU
loss does not train the mask); scripting and tracing give the eager masks and mask scores;
the whole model trains and predicts mask_scores; the COCO records carry them for segm.
"""
import json
from typing import List

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead, build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from jit_testutils import scripted_with_instances, torchscript_patch, trace
from mask_head_testutils import (
    BOXES,
    inference_instances,
    mask_cfg,
    randomize_,
    tiny_batch,
    tiny_mask_rcnn_cfg,
    training_instances,
)
from torch import Tensor, nn

from fpn_plugin.deploy import MASK_RCNN_FIELDS, plugin_fields
from fpn_plugin.evaluation import evaluate_coco_results_json
from fpn_plugin.export import instances_to_coco_results
from fpn_plugin.mask_head import ConvUpsampleMaskHead, MaskScoringHead
from fpn_plugin.mask_head.mask_scoring import mask_iou_targets, rescore_masks

POOLED = ShapeSpec(channels=8, height=7, width=7)
FIELDS = {"pred_boxes": Boxes, "pred_classes": Tensor, "scores": Tensor, "pred_masks": Tensor,
          "mask_scores": Tensor}


def _scoring_head(seed=0, **keys):
    cfg = mask_cfg("MaskScoringHead", POOLER_RESOLUTION=7)
    for key, value in keys.items():
        cfg.MODEL.ROI_MASK_HEAD.MASK_SCORING[key] = value
    torch.manual_seed(seed)
    return build_mask_head(cfg, POOLED)


def _small_kwargs():
    return dict(num_classes=3, conv_dims=[16, 16, 16], conv_norm="")


def _pooled(num, seed=0):
    return torch.randn(num, 8, 7, 7, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("plain_cls", [ConvUpsampleMaskHead, MaskRCNNConvUpsampleHead],
                         ids=["plugin", "detectron2"])
def test_plain_head_checkpoint_loads_with_only_the_branch_missing(plain_cls):
    torch.manual_seed(0)
    plain = randomize_(plain_cls(POOLED, **_small_kwargs()))
    torch.manual_seed(1)
    head = MaskScoringHead(POOLED, **_small_kwargs(), maskiou_num_conv=2, maskiou_conv_dim=8,
                           maskiou_num_fc=1, maskiou_fc_dim=16)
    fresh = {k: v.clone() for k, v in head.state_dict().items() if k.startswith("maskiou_head.")}
    result = head.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(fresh) and fresh
    # The branch keeps its fresh initialisation.
    assert all(torch.equal(head.state_dict()[k], v) for k, v in fresh.items())
    x = _pooled(5)
    with torch.no_grad():
        assert torch.equal(head.layers(x), plain.layers(x))
    # The same mask loss.
    plain.train(), head.train()
    instances = training_instances(BOXES, num_classes=3)
    x = _pooled(sum(len(i) for i in instances), seed=2)
    with EventStorage(0):
        ours = head(x, instances)
        theirs = plain(x, instances)
    assert set(ours) == {"loss_mask", "loss_maskiou"}
    assert torch.equal(ours["loss_mask"], theirs["loss_mask"])


def test_fresh_build_starts_from_the_plain_heads_weights():
    torch.manual_seed(0)
    plain = ConvUpsampleMaskHead(POOLED, **_small_kwargs())
    torch.manual_seed(0)
    head = MaskScoringHead(POOLED, **_small_kwargs())
    theirs = plain.state_dict()
    ours = {k: v for k, v in head.state_dict().items() if not k.startswith("maskiou_head.")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_mask_iou_targets_on_a_hand_made_case():
    # One ROI covering a 4x4 image, a 4x4 mask grid: each cell is one pixel.
    inst = Instances((4, 4))
    inst.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]]))
    inst.gt_classes = torch.tensor([1, 0])
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[0, :2, :] = True  # top half: 8 pixels
    gt[1, :, :] = False  # empty ground truth
    inst.gt_masks = BitMasks(gt)
    logits = torch.full((2, 2, 4, 4), -3.0)
    logits[0, 1, :, :2] = 3.0  # class 1 (the GT class of ROI 0): left half, 8 pixels
    logits[0, 0] = 3.0  # class 0 would be a full mask; not the GT class of ROI 0
    # ROI 1: class 0 predicts nothing either: empty union counts as IoU 0.
    classes, ious = mask_iou_targets(logits, [inst])
    assert classes.tolist() == [1, 0]
    # Left half vs top half: intersection 4, union 12.
    assert torch.allclose(ious, torch.tensor([4.0 / 12.0, 0.0]))
    # Class-agnostic logits: channel 0 for every ROI.
    classes, ious = mask_iou_targets(logits[:, :1], [inst])
    assert classes.tolist() == [0, 0] and torch.allclose(ious, torch.tensor([8.0 / 16.0, 0.0]))


def test_mask_scores_are_detection_scores_times_predicted_iou_on_a_hand_made_case():
    head = _scoring_head().eval()
    with torch.no_grad():  # a branch that predicts a fixed IoU per class
        head.maskiou_head.predictor.weight.zero_()
        head.maskiou_head.predictor.bias.copy_(torch.tensor([0.5, 1.5, -0.2]))
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 40.0]] * 4))
    inst.pred_classes = torch.tensor([0, 1, 2, 0])
    inst.scores = torch.tensor([0.8, 0.4, 0.9, 0.25])
    with torch.no_grad():
        (out,) = head(_pooled(4), [inst])
    # 0.8 x 0.5; 0.4 x 1 (1.5 clamped); 0.9 x 0 (-0.2 clamped); 0.25 x 0.5.
    assert torch.allclose(out.mask_scores, torch.tensor([0.4, 0.4, 0.0, 0.125]))
    assert torch.equal(out.scores, torch.tensor([0.8, 0.4, 0.9, 0.25]))  # boxes keep theirs
    assert out.pred_masks.shape == (4, 1, 14, 14)
    assert torch.equal(rescore_masks(torch.tensor([0.5]), torch.tensor([0.3])),
                       torch.tensor([0.5]) * torch.tensor([0.3]))


def test_loss_is_l2_and_gradients_reach_every_new_parameter():
    head = randomize_(_scoring_head(LOSS_WEIGHT=2.0), std=0.1).train()
    instances = training_instances(BOXES, num_classes=3)
    x = _pooled(sum(len(i) for i in instances)).requires_grad_(True)
    with EventStorage(0):
        losses = head(x, instances)
    logits = head.layers(x)
    classes, targets = mask_iou_targets(logits, instances)
    rows = torch.arange(len(classes))
    pred = head.maskiou_head(x, logits.detach()[rows, classes][:, None].sigmoid())[rows, classes]
    assert 0 < targets.max() <= 1  # the hand-offset polygons overlap the predicted masks
    assert torch.allclose(losses["loss_maskiou"], 2.0 * ((pred - targets) ** 2).mean())

    # The IoU loss trains the branch and the ROI features, not the mask predictor.
    losses["loss_maskiou"].backward(retain_graph=True)
    branch = dict(head.maskiou_head.named_parameters())
    no_grad = [n for n, p in branch.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached maskiou_head.{no_grad}"
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert head.predictor.weight.grad is None
    losses["loss_mask"].backward()
    assert head.predictor.weight.grad.abs().sum() > 0


def test_no_foreground_roi_gives_zero_losses():
    head = _scoring_head().train()
    empty = training_instances([[]], num_classes=3)
    with EventStorage(0):
        losses = head(torch.zeros(0, 8, 7, 7), empty)
    assert losses["loss_maskiou"].item() == 0.0 and torch.isfinite(losses["loss_mask"])


def test_scripted_head_equals_eager():
    head = randomize_(_scoring_head(), std=0.1).eval()
    eager = inference_instances(BOXES, num_classes=3)
    x = _pooled(sum(len(i) for i in eager))
    with torch.no_grad():
        head(x, eager)
    with scripted_with_instances(head, FIELDS) as (scripted, to_scripted):
        got = scripted(x, [to_scripted(i) for i in inference_instances(BOXES, num_classes=3)])
    for g, e in zip(got, eager):
        assert torch.equal(g.pred_masks, e.pred_masks)
        assert torch.equal(g.mask_scores, e.mask_scores)
        assert not torch.equal(e.mask_scores, e.scores)
    # Scripting worked on a copy: the eager head keeps the plain head's parameter names.
    assert "mask_fcn1.weight" in head.state_dict() and "predictor.weight" in head.state_dict()


class _MasksAndScores(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, boxes: List[Tensor], classes: List[Tensor], scores: List[Tensor]):
        instances = []
        for b, c, s in zip(boxes, classes, scores):
            inst = Instances((64, 64))
            inst.pred_boxes, inst.pred_classes, inst.scores = Boxes(b), c, s
            instances.append(inst)
        out = self.head(x, instances)
        return [i.pred_masks for i in out], [i.mask_scores for i in out]


def test_traced_head_equals_eager_for_other_detections():
    wrapper = _MasksAndScores(randomize_(_scoring_head(), std=0.1).eval())

    def inputs(boxes_per_image, seed):
        instances = inference_instances(boxes_per_image, num_classes=3, seed=seed)
        return (_pooled(sum(len(i) for i in instances), seed),
                [i.pred_boxes.tensor for i in instances], [i.pred_classes for i in instances],
                [i.scores for i in instances])

    with torch.no_grad(), torchscript_patch().patch_builtin_len():
        traced = trace(wrapper, inputs(BOXES, 0))
        for args in (inputs(BOXES, 1), inputs([[[1.0, 2.0, 20.0, 30.0]], BOXES[0] + BOXES[1]], 2)):
            (got_m, got_s), (want_m, want_s) = traced(*args), wrapper(*args)
            for a, b in zip(got_m + got_s, want_m + want_s):
                assert torch.equal(a, b)


def test_whole_model_trains_and_predicts_mask_scores():
    cfg = tiny_mask_rcnn_cfg("MaskScoringHead")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert plugin_fields(model) == dict(MASK_RCNN_FIELDS, mask_scores=torch.Tensor)
    with EventStorage(0):
        losses = model(tiny_batch())
    assert "loss_maskiou" in losses and torch.isfinite(losses["loss_maskiou"])
    sum(losses.values()).backward()
    new = [n for n, p in model.named_parameters() if "maskiou_head" in n]
    assert new and all(dict(model.named_parameters())[n].grad is not None for n in new)

    model.eval()
    with torch.no_grad():
        (result,) = model.inference([{"image": tiny_batch(1)[0]["image"]}], do_postprocess=False)
    assert len(result) > 0
    assert (result.mask_scores <= result.scores).all() and (result.mask_scores >= 0).all()
    pasted = detector_postprocess(result, 96, 96)  # the field survives Detectron2's rescaling
    assert torch.equal(pasted.mask_scores, result.mask_scores)
    torch.manual_seed(0)
    plain = build_model(tiny_mask_rcnn_cfg("ConvUpsampleMaskHead"))
    assert plugin_fields(plain) == MASK_RCNN_FIELDS


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def test_coco_records_carry_mask_scores_and_segm_is_scored_with_them(tmp_path):
    """A hand-made image: detection A has the better box score but a wrong mask, B the better
    mask score and the right mask. bbox AP is A's; segm AP is 100 only if B ranks first,
    i.e. with the mask scores (50 with the box scores)."""
    gt_mask = np.zeros((40, 40), dtype=bool)
    gt_mask[10:30, 10:30] = True
    gt = {"images": [{"id": 1, "width": 40, "height": 40, "file_name": "a.png"}],
          "categories": [{"id": 7, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20],
                           "area": 400, "iscrowd": 0, "segmentation": _rle(gt_mask)}]}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    wrong = np.zeros((40, 40), dtype=bool)
    wrong[0:5, 0:5] = True
    inst = Instances((40, 40))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]]))
    inst.scores = torch.tensor([0.9, 0.2])
    inst.pred_classes = torch.tensor([0, 0])
    inst.pred_masks = torch.from_numpy(np.stack([wrong, gt_mask]))
    inst.mask_scores = torch.tensor([0.1, 0.8])
    records = instances_to_coco_results(inst, 1, {0: 7})
    assert [r["score"] for r in records] == pytest.approx([0.9, 0.2])
    assert [r["mask_score"] for r in records] == pytest.approx([0.1, 0.8])
    metrics = evaluate_coco_results_json(records, gt_json=str(gt_path))
    assert metrics["bbox"]["AP50"] == pytest.approx(100.0)
    assert metrics["segm"]["AP50"] == pytest.approx(100.0)
    without = [{k: v for k, v in r.items() if k != "mask_score"} for r in records]
    assert evaluate_coco_results_json(without, gt_json=str(gt_path))["segm"]["AP50"] \
        == pytest.approx(50.0, abs=1.0)
    inst.remove("mask_scores")
    assert not any("mask_score" in r for r in instances_to_coco_results(inst, 1, {0: 7}))


@pytest.mark.parametrize("key, value", [("NUM_CONV", 0), ("CONV_DIM", -4), ("NUM_FC", -1),
                                        ("FC_DIM", 0), ("LOSS_WEIGHT", -1.0)])
def test_invalid_keys_are_named(key, value):
    with pytest.raises(ValueError, match=f"MODEL.ROI_MASK_HEAD.MASK_SCORING.{key}"):
        _scoring_head(**{key: value})


def test_zero_fc_layers_and_one_conv_still_predict_per_class():
    head = _scoring_head(NUM_CONV=1, NUM_FC=0).eval()
    assert len(head.maskiou_head.fcs) == 0
    out = head.maskiou_head(_pooled(2), torch.rand(2, 1, 14, 14))
    assert out.shape == (2, 3)
