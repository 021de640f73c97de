"""The detection-by-detection comparison the CUDA tests use (tests/detection_testutils.py),
checked on CPU: it accepts a rounding-level difference and catches a class swap, a mask from
another detection and a shifted box, which sorted-score or first-N comparisons miss."""
import pytest
import torch
from detectron2.structures import Boxes, Instances
from detection_testutils import assert_same_detections, pair_detections


def _dets(boxes, classes, scores, size=64):
    inst = Instances((size, size))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.pred_classes = torch.tensor(classes)
    inst.scores = torch.tensor(scores)
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, int(y0):int(y1), int(x0):int(x1)] = True
    inst.pred_masks = masks
    return inst


BOXES = [[0, 0, 20, 20], [30, 30, 60, 60], [0, 0, 20, 20], [10, 40, 30, 62]]
CLASSES = [0, 1, 2, 1]
SCORES = [0.9, 0.8, 0.7, 0.3]
TOL = dict(box_atol=1e-3, score_atol=1e-4, min_mask_iou=0.95)


def _shuffled(inst, order):
    return inst[torch.tensor(order)]


def test_same_detections_in_another_order_with_rounding_pass():
    want = _dets(BOXES, CLASSES, SCORES)
    got = _shuffled(_dets(BOXES, CLASSES, [s + 3e-5 for s in SCORES]), [3, 1, 0, 2])
    got.pred_boxes.tensor += 2e-4
    pairing = assert_same_detections(got, want, **TOL)
    assert len(pairing.pairs) == 4
    # The two detections on one box are told apart by class.
    assert sorted(pairing.pairs) == [(0, 2), (1, 1), (2, 3), (3, 0)]


def test_unpaired_detection_allowed_only_at_the_cut_off():
    want = _dets(BOXES, CLASSES, SCORES)
    got = _dets(BOXES[:3], CLASSES[:3], SCORES[:3])  # the lowest-scoring one fell off
    assert_same_detections(got, want, **{**TOL, "score_atol": 0.5})  # 0.3 within 0.5 of 0.3
    with pytest.raises(AssertionError, match="no partner"):
        assert_same_detections(_dets(BOXES[1:], CLASSES[1:], SCORES[1:]), want, **TOL)


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d.pred_classes.__setitem__(1, 0), "no partner"),         # class swapped
    (lambda d: d.pred_masks.__setitem__(1, d.pred_masks[3].clone()), "paired mask"),
    (lambda d: d.pred_boxes.tensor.__setitem__(1, d.pred_boxes.tensor[1] + 0.2), "close"),
    (lambda d: d.scores.__setitem__(0, d.scores[0] - 0.01), "close"),
], ids=["class", "mask", "box", "score"])
def test_each_kind_of_difference_is_caught(break_it, message):
    want = _dets(BOXES, CLASSES, SCORES)
    got = _dets(BOXES, CLASSES, SCORES)
    break_it(got)
    with pytest.raises(AssertionError, match=message):
        assert_same_detections(got, want, **TOL)
    # What the old checks compared (sorted scores, the first boxes) misses the class and
    # mask cases.
    if message in ("no partner", "paired mask"):
        assert torch.equal(got.scores.sort().values, want.scores.sort().values)


def test_pairing_needs_the_box_overlap():
    a = _dets([[0, 0, 20, 20]], [0], [0.9])
    b = _dets([[0, 0, 20, 10]], [0], [0.9])  # IoU 0.5
    assert pair_detections(a, b, 0.9).pairs == []
    assert pair_detections(a, b, 0.5).pairs == [(0, 0)]
