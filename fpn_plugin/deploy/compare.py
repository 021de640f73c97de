"""
How far a deployed model's detections are from the eager model's, for one image.

Detections are paired, not compared by position: a deployed runtime with other kernels (ONNX
Runtime) may change scores in the last bits and so swap two nearly tied detections, which is
not an error. Each eager detection, in score order, takes the unpaired deployed detection of
its class whose box is closest (largest coordinate difference, then score difference), if
that box is within :data:`PAIR_DISTANCE` pixels (a distance, not IoU: degenerate boxes of zero
width, which untrained models emit, have no IoU); what stays unpaired is counted. The
largest differences are then taken over the pairs: box coordinates (pixels of the model
input), scores, mask probabilities (the box-local ``(M, M)`` masks) and, after pasting at the
original image size as Detectron2's ``detector_postprocess`` pastes, mask pixels.
"""
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Instances

__all__ = ["PAIR_DISTANCE", "DetectionDiff", "Tolerances", "compare_detections",
           "pair_detections"]

PAIR_DISTANCE = 1.0  # pixels of the model input; far above any tolerance


@dataclass(frozen=True)
class Tolerances:
    """Largest differences a deployed model may show against eager and still pass."""

    boxes: float = 0.05  # pixels of the model input
    scores: float = 1e-4
    # Mask probabilities: they are pooled at the boxes, so another runtime's box arithmetic
    # (ONNX Runtime: ~1e-3 px) moves them too; up to 8e-3 measured on the test models.
    masks: float = 0.02

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"tolerance {name} must be a number >= 0, got {value!r}")


@dataclass
class DetectionDiff:
    """One image's comparison (all numbers JSON-ready)."""

    eager_detections: int
    deployed_detections: int
    paired: int
    same_order: bool  # every pair is (i, i) and the counts are equal
    bitwise_equal: bool  # same order and every field exactly equal
    max_box_diff: float
    max_score_diff: float
    max_mask_diff: float
    pasted_mask_pixels_differing: int
    pasted_mask_pixels: int

    @property
    def unpaired(self) -> int:
        return self.eager_detections + self.deployed_detections - 2 * self.paired

    def within(self, tol: Tolerances) -> bool:
        return (self.unpaired == 0 and self.max_box_diff <= tol.boxes
                and self.max_score_diff <= tol.scores and self.max_mask_diff <= tol.masks)

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), unpaired=self.unpaired)


def pair_detections(eager: Instances, deployed: Instances) -> List[Tuple[int, int]]:
    """(eager index, deployed index) pairs: same class, greedy in eager (score) order, closest
    box first (then closest score), boxes at most :data:`PAIR_DISTANCE` apart."""
    if len(eager) == 0 or len(deployed) == 0:
        return []
    a, b = eager.pred_boxes.tensor.float(), deployed.pred_boxes.tensor.float()
    distance = (a[:, None, :] - b[None, :, :]).abs().amax(dim=2)  # (Ra, Rb)
    score_gap = (eager.scores[:, None].float() - deployed.scores[None, :].float()).abs()
    usable = (distance <= PAIR_DISTANCE) & (
        eager.pred_classes[:, None] == deployed.pred_classes[None, :])
    distance = torch.where(usable, distance, torch.full_like(distance, float("inf")))
    pairs = []
    for i in range(len(eager)):
        closest = distance[i].min()
        if torch.isinf(closest):
            continue
        # Among equally close boxes (duplicates), the closest score.
        gaps = torch.where(distance[i] == closest, score_gap[i], torch.full_like(closest, 2.0))
        j = int(gaps.argmin())
        pairs.append((i, j))
        distance[:, j] = float("inf")
    return pairs


def _pasted_masks(instances: Instances, height: int, width: int, threshold: float):
    """Bool ``(R, height, width)``: Detectron2's ``detector_postprocess`` masks, without its
    dropping of empty boxes (so both sides keep their pairs)."""
    boxes = instances.pred_boxes.clone()
    boxes.scale(width / instances.image_size[1], height / instances.image_size[0])
    boxes.clip((height, width))
    return paste_masks_in_image(instances.pred_masks[:, 0, :, :], boxes, (height, width),
                                threshold=threshold)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def compare_detections(eager: Instances, deployed: Instances, height: int, width: int,
                       mask_threshold: float = 0.5) -> DetectionDiff:
    """
    Args:
        eager, deployed: raw detections (``do_postprocess=False``) of the same input image:
            ``pred_boxes``, ``pred_classes``, ``scores``, ``pred_masks`` ``(R, 1, M, M)``.
        height, width: the original image's size (for the pasted-mask comparison).
        mask_threshold: Detectron2's mask binarisation threshold.
    """
    eager = eager.to("cpu")
    deployed = deployed.to("cpu")
    pairs = pair_detections(eager, deployed)
    i = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    j = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    a, b = eager[i], deployed[j]
    same_order = len(eager) == len(deployed) == len(pairs) and bool((i == j).all())
    fields = ("pred_classes", "scores", "pred_masks")
    bitwise = same_order and torch.equal(eager.pred_boxes.tensor, deployed.pred_boxes.tensor) \
        and all(torch.equal(eager.get(f), deployed.get(f)) for f in fields)
    pasted_a = _pasted_masks(a, height, width, mask_threshold)
    pasted_b = _pasted_masks(b, height, width, mask_threshold)
    return DetectionDiff(
        eager_detections=len(eager),
        deployed_detections=len(deployed),
        paired=len(pairs),
        same_order=same_order,
        bitwise_equal=bitwise,
        max_box_diff=_max_abs(a.pred_boxes.tensor, b.pred_boxes.tensor),
        max_score_diff=_max_abs(a.scores, b.scores),
        max_mask_diff=_max_abs(a.pred_masks, b.pred_masks),
        pasted_mask_pixels_differing=int((pasted_a != pasted_b).sum()),
        pasted_mask_pixels=int(pasted_a.numel()),
    )
