"""Comparing two sets of detections of one image (another device, another precision) detection
by detection: pair them by class and box IoU, then compare boxes, scores and masks of each
pair. Sorted score lists or the first N boxes compare numbers detached from what they belong
to, so a class swap or a mask from another box would pass them."""
from dataclasses import dataclass
from typing import List, Tuple

import torch
from detectron2.structures import pairwise_iou


@dataclass
class Pairing:
    pairs: List[Tuple[int, int]]  # (index in a, index in b)
    unpaired_a: List[int]
    unpaired_b: List[int]


def pair_detections(a, b, min_iou: float) -> Pairing:
    """Greedy, best score of ``a`` first: each detection of ``a`` takes the unpaired detection
    of ``b`` with the same class and the highest box IoU, if that IoU is at least ``min_iou``.
    ``a``, ``b``: Instances with pred_boxes, pred_classes, scores, on the same device."""
    iou = pairwise_iou(a.pred_boxes, b.pred_boxes)
    same_class = a.pred_classes[:, None] == b.pred_classes[None, :]
    iou = torch.where(same_class, iou, torch.full_like(iou, -1.0))
    taken = torch.zeros(len(b), dtype=torch.bool)
    pairs, unpaired_a = [], []
    for i in torch.argsort(a.scores, descending=True).tolist():
        row = iou[i].masked_fill(taken, -1.0)
        j = int(row.argmax()) if len(b) else -1
        if j >= 0 and row[j] >= min_iou:
            taken[j] = True
            pairs.append((i, j))
        else:
            unpaired_a.append(i)
    return Pairing(pairs, unpaired_a, [j for j in range(len(b)) if not taken[j]])


def mask_iou(m1: torch.Tensor, m2: torch.Tensor) -> float:
    union = (m1 | m2).sum().item()
    return 1.0 if union == 0 else (m1 & m2).sum().item() / union


def assert_same_detections(got, want, *, box_atol: float, score_atol: float,
                           min_mask_iou: float, min_box_iou: float = 0.9):
    """Every detection of ``want`` has a partner in ``got`` (same class, IoU >= min_box_iou) and
    the reverse, except at the cut-off: a detection may be unpaired only when its score is
    within ``score_atol`` of the lowest score its own list kept (the DETECTIONS_PER_IMAGE /
    score-threshold boundary, where rounding decides what is kept). Paired detections agree in
    box (``box_atol`` pixels), score (``score_atol``) and mask (IoU >= ``min_mask_iou``).
    Returns the pairing (for further checks)."""
    got, want = got.to("cpu"), want.to("cpu")
    assert len(want) > 0, "nothing to compare"
    pairing = pair_detections(want, got, min_box_iou)
    for name, inst, unpaired in (("want", want, pairing.unpaired_a),
                                 ("got", got, pairing.unpaired_b)):
        floor = inst.scores.min().item()
        far = [i for i in unpaired if inst.scores[i].item() > floor + score_atol]
        assert not far, (f"{len(far)} detections of {name!r} have no partner and score above the "
                         f"cut-off (+{score_atol}): scores {inst.scores[far][:5].tolist()}")
    assert len(pairing.pairs) >= 0.5 * len(want), (len(pairing.pairs), len(want))
    ia = torch.tensor([p[0] for p in pairing.pairs])
    ib = torch.tensor([p[1] for p in pairing.pairs])
    torch.testing.assert_close(got.pred_boxes.tensor[ib], want.pred_boxes.tensor[ia],
                               atol=box_atol, rtol=0)
    torch.testing.assert_close(got.scores[ib], want.scores[ia], atol=score_atol, rtol=0)
    assert torch.equal(got.pred_classes[ib], want.pred_classes[ia])
    if want.has("pred_masks"):
        worst = min(mask_iou(got.pred_masks[j].bool(), want.pred_masks[i].bool())
                    for i, j in pairing.pairs)
        assert worst >= min_mask_iou, f"a paired mask has IoU {worst:.3f} < {min_mask_iou}"
    return pairing
