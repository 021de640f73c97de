"""
``PerLevelRPN``: Detectron2's RPN with per-level proposal selection and per-level statistics.

Anchor labelling, sampling and the losses are Detectron2's own (inherited), so training
matches the built-in RPN exactly; what changes is the post-processing (one batched NMS keyed
by image and level, per-level top-k lists, a per-level post-NMS top-k option), the level
recorded on inference proposals, and per-level numbers in the EventStorage.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..utils.registry import register
from .config import POST_NMS_TOPK_MODES, check_anchor_params, per_level_values
from .postprocess import find_top_proposals_per_level

__all__ = ["PerLevelRPN"]

TopK = Union[int, Sequence[int]]


def _per_level_arg(value: TopK, num_levels: int, name: str) -> List[int]:
    values = [value] * num_levels if isinstance(value, int) else list(value)
    if len(values) != num_levels or any(not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(
            f"{name} must be a positive int or {num_levels} positive ints, got {value}"
        )
    return values


@register(PROPOSAL_GENERATOR_REGISTRY)
class PerLevelRPN(RPN):
    """
    Region proposal network for a feature pyramid: each level is scored, decoded and top-k'ed
    on its own, NMS runs within each level, and the levels' survivors are merged per image.

    With the defaults (same pre-NMS top-k on all levels, post-NMS top-k per image) its
    proposals, objectness logits and losses equal Detectron2's ``RPN``; it has the same
    parameters and buffers, so Detectron2 checkpoints load into it unchanged.

    Inference proposals carry ``proposal_levels`` (int64, index into ``in_features``). Training
    proposals do not (ROI heads' ``add_ground_truth_to_proposals`` requires every proposal
    field to exist on the ground truth). Training puts per level ``f`` in the EventStorage,
    averaged over the images of the batch: ``rpn/num_pos_anchors_f`` and
    ``rpn/num_neg_anchors_f`` (sampled anchors), ``rpn/num_proposals_after_nms_f`` and
    ``rpn/num_proposals_f`` (after the post-NMS top-k).
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        pre_nms_topk: Tuple[TopK, TopK],
        post_nms_topk: Tuple[TopK, TopK],
        post_nms_topk_mode: str = "per_image",
        **kwargs,
    ):
        """
        Args:
            in_features, and every other keyword: as Detectron2's :class:`RPN`.
            pre_nms_topk (tuple): (train, test); each an int used on every level or a list
                with one int per level of ``in_features``.
            post_nms_topk (tuple): (train, test). ``post_nms_topk_mode="per_image"``: ints,
                proposals kept per image over all levels. ``"per_level"``: each an int or a
                per-level list, survivors kept per level of each image.
            post_nms_topk_mode (str): "per_image" (Detectron2) or "per_level".
        """
        super().__init__(
            in_features=in_features,
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=post_nms_topk,
            **kwargs,
        )
        num_levels = len(in_features)
        if post_nms_topk_mode not in POST_NMS_TOPK_MODES:
            raise ValueError(
                f"post_nms_topk_mode must be one of {POST_NMS_TOPK_MODES}, "
                f"got {post_nms_topk_mode!r}"
            )
        if self.anchor_generator.box_dim != 4:
            raise ValueError("PerLevelRPN handles axis-aligned boxes only (use RRPN for rotated)")
        self.pre_nms_topk: Dict[bool, List[int]] = {
            True: _per_level_arg(pre_nms_topk[0], num_levels, "pre_nms_topk[0] (train)"),
            False: _per_level_arg(pre_nms_topk[1], num_levels, "pre_nms_topk[1] (test)"),
        }
        self.post_nms_topk_per_level = post_nms_topk_mode == "per_level"
        post_levels = num_levels if self.post_nms_topk_per_level else 1
        if not self.post_nms_topk_per_level and not all(isinstance(k, int) for k in post_nms_topk):
            raise ValueError(
                "per-level post_nms_topk lists need post_nms_topk_mode='per_level', "
                f"got {post_nms_topk}"
            )
        self.post_nms_topk: Dict[bool, List[int]] = {
            True: _per_level_arg(post_nms_topk[0], post_levels, "post_nms_topk[0] (train)"),
            False: _per_level_arg(post_nms_topk[1], post_levels, "post_nms_topk[1] (test)"),
        }

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        rpn = cfg.MODEL.RPN
        in_features = list(rpn.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"MODEL.RPN.IN_FEATURES = {in_features} must name backbone outputs "
                f"{sorted(input_shape)}; unknown: {missing}"
            )
        num_levels = len(in_features)
        # Checked here so a mismatch names the key (Detectron2's anchor generator only asserts).
        check_anchor_params(
            cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            num_levels,
            in_features,
        )
        mode = rpn.POST_NMS_TOPK_MODE
        if mode not in POST_NMS_TOPK_MODES:
            raise ValueError(
                f"MODEL.RPN.POST_NMS_TOPK_MODE must be one of {POST_NMS_TOPK_MODES}, got {mode!r}"
            )
        pre_nms_topk = tuple(
            per_level_values(
                rpn.get(f"PRE_NMS_TOPK_{s}"),
                rpn.get(f"PRE_NMS_TOPK_{s}_PER_LEVEL"),
                num_levels,
                f"MODEL.RPN.PRE_NMS_TOPK_{s}_PER_LEVEL",
                f"MODEL.RPN.PRE_NMS_TOPK_{s}",
            )
            for s in ("TRAIN", "TEST")
        )
        post_nms_topk = []
        for s in ("TRAIN", "TEST"):
            scalar_key = f"MODEL.RPN.POST_NMS_TOPK_{s}"
            list_key = f"{scalar_key}_PER_LEVEL"
            scalar = rpn.get(f"POST_NMS_TOPK_{s}")
            per_level = rpn.get(f"POST_NMS_TOPK_{s}_PER_LEVEL")
            if mode == "per_level":
                post_nms_topk.append(
                    per_level_values(scalar, per_level, num_levels, list_key, scalar_key)
                )
                continue
            if len(per_level):
                raise ValueError(
                    f"{list_key} = {list(per_level)} needs MODEL.RPN.POST_NMS_TOPK_MODE: "
                    f"per_level (it is {mode!r}, where {scalar_key} applies per image)"
                )
            post_nms_topk.append(per_level_values(scalar, [], 1, list_key, scalar_key)[0])

        ret = super().from_config(cfg, input_shape)
        if ret["anchor_generator"].box_dim != 4:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.NAME = {cfg.MODEL.ANCHOR_GENERATOR.NAME!r} makes rotated "
                "anchors; PerLevelRPN handles axis-aligned boxes (use RRPN)"
            )
        ret.update(
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=tuple(post_nms_topk),
            post_nms_topk_mode=mode,
        )
        return ret

    @torch.jit.unused
    def losses(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        gt_labels: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """Detectron2's RPN losses, plus per-level sampled anchor counts in the EventStorage."""
        losses = super().losses(
            anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
        )
        labels = torch.stack(gt_labels)  # (N, sum_i Hi*Wi*Ai)
        sizes = [x.shape[1] for x in pred_objectness_logits]
        counts = torch.stack(
            [torch.stack(((x == 1).sum(), (x == 0).sum())) for x in labels.split(sizes, dim=1)]
        )  # (L, 2)
        counts = (counts.float() / len(gt_labels)).tolist()  # one sync for all levels
        storage = get_event_storage()
        for name, (num_pos, num_neg) in zip(self.in_features, counts):
            storage.put_scalar(f"rpn/num_pos_anchors_{name}", num_pos)
            storage.put_scalar(f"rpn/num_neg_anchors_{name}", num_neg)
        return losses

    def predict_proposals(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ):
        """
        Decode the deltas and select proposals per level (see
        :func:`~fpn_plugin.rpn.postprocess.find_top_proposals_per_level`).

        Args:
            anchors (list[Boxes]): L anchor sets, level i (Hi*Wi*Ai, 4).
            pred_objectness_logits (list[Tensor]): L tensors, level i (N, Hi*Wi*Ai).
            pred_anchor_deltas (list[Tensor]): L tensors, level i (N, Hi*Wi*Ai, 4).
            image_sizes (list[tuple[int, int]]): (h, w) of each image.

        Returns:
            list[Instances]: N Instances with ``proposal_boxes``, ``objectness_logits`` (in
                decreasing order) and, in inference, ``proposal_levels``.
        """
        # Proposals are constants for the second stage (approximate joint training), as in
        # Detectron2.
        with torch.no_grad():
            pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            boxes, scores, levels, nms_counts = find_top_proposals_per_level(
                pred_proposals,
                pred_objectness_logits,
                image_sizes,
                self.nms_thresh,
                self.pre_nms_topk[self.training],
                self.post_nms_topk[self.training],
                self.post_nms_topk_per_level,
                self.min_box_size,
                self.training,
            )
        results: List[Instances] = []
        for image_size, boxes_i, scores_i, levels_i in zip(image_sizes, boxes, scores, levels):
            res = Instances(image_size)
            res.proposal_boxes = Boxes(boxes_i)
            res.objectness_logits = scores_i
            if not self.training:
                res.proposal_levels = levels_i
            results.append(res)
        if self.training:
            self._put_proposal_stats(levels, nms_counts)
        return results

    @torch.jit.unused
    def _put_proposal_stats(self, levels: List[torch.Tensor], nms_counts: torch.Tensor):
        num_levels = len(self.in_features)
        final = sum(torch.bincount(lv, minlength=num_levels) for lv in levels)
        stats = torch.stack((nms_counts.sum(dim=0), final)).float() / max(len(levels), 1)
        storage = get_event_storage()
        for name, after_nms, kept in zip(self.in_features, *stats.tolist()):
            storage.put_scalar(f"rpn/num_proposals_after_nms_{name}", after_nms)
            storage.put_scalar(f"rpn/num_proposals_{name}", kept)
