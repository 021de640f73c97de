"""
``PerLevelRPN``: Detectron2's RPN with per-level proposal selection and per-level statistics.

Anchor labelling, sampling and the losses are Detectron2's own (inherited), so training
matches the built-in RPN exactly; what changes is the post-processing (one batched NMS keyed
by image and level, per-level top-k lists, a per-level post-NMS top-k option), the level
recorded on inference proposals (on request), and per-level numbers in the EventStorage.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..utils.config import require_plugin_keys
from ..utils.registry import register
from .config import POST_NMS_TOPK_MODES, add_rpn_config, check_anchor_keys, per_level_ints
from .postprocess import find_top_proposals_per_level

__all__ = ["PerLevelRPN"]

TopK = Union[int, Sequence[int]]
_PHASES = ("TRAIN", "TEST")


@register(PROPOSAL_GENERATOR_REGISTRY)
class PerLevelRPN(RPN):
    """
    Region proposal network for a feature pyramid: each level is scored, decoded and top-k'ed
    on its own, NMS runs within each level, and the levels' survivors are merged per image.

    With the defaults (same pre-NMS top-k on all levels, post-NMS top-k per image) its
    proposals, objectness logits and losses equal Detectron2's ``RPN``; it has the same
    parameters and buffers, so Detectron2 checkpoints load into it unchanged.

    With ``record_proposal_levels=True`` inference proposals also carry ``proposal_levels``
    (int64, index into ``in_features``); by default they have Detectron2's fields only, so the
    model scripts with Detectron2's field list (``fpn_plugin.deploy.plugin_fields()`` adds this
    one). Training proposals never carry it (ROI heads' ``add_ground_truth_to_proposals``
    requires every proposal field to exist on the ground truth). Training puts per level ``f``
    in the EventStorage,
    averaged over the images of the batch: ``rpn/num_pos_anchors_f`` and
    ``rpn/num_neg_anchors_f`` (sampled anchors), ``rpn/num_proposals_after_nms_f`` and
    ``rpn/num_proposals_f`` (after the post-NMS top-k).
    """

    pre_nms_topk: Dict[bool, List[int]]
    post_nms_topk: Dict[bool, Optional[int]]
    post_nms_topk_per_level: Optional[Dict[bool, List[int]]]
    # A constant for TorchScript: when False, the field is never set in the compiled code, so
    # Detectron2's field list (without proposal_levels) scripts the model.
    record_proposal_levels: torch.jit.Final[bool]

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        pre_nms_topk: Tuple[TopK, TopK],
        post_nms_topk: Tuple[Optional[int], Optional[int]],
        post_nms_topk_per_level: Optional[Tuple[TopK, TopK]] = None,
        record_proposal_levels: bool = False,
        **kwargs,
    ):
        """
        Args:
            in_features, and every other keyword: as Detectron2's :class:`RPN`.
            pre_nms_topk (tuple): (train, test) candidates taken per level of each image before
                NMS; each an int used on every level or a list with one int per level.
            post_nms_topk (tuple): (train, test) proposals kept per image over all levels after
                NMS (Detectron2's meaning); None: no per-image limit (then
                ``post_nms_topk_per_level`` must be given).
            post_nms_topk_per_level (tuple or None): (train, test) NMS survivors kept per level
                of each image, each an int used on every level or a list with one int per
                level; the image gets their union. None: no per-level limit (Detectron2).
            record_proposal_levels (bool): set ``proposal_levels`` on inference proposals.

        Raises:
            ValueError: on an invalid value, naming the config key that sets it.
        """
        super().__init__(
            in_features=in_features,
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=post_nms_topk,
            **kwargs,
        )
        if not isinstance(record_proposal_levels, bool):
            raise ValueError(
                "MODEL.RPN.RECORD_PROPOSAL_LEVELS must be True or False, got "
                f"{record_proposal_levels!r}"
            )
        self.record_proposal_levels = record_proposal_levels
        if self.anchor_generator.box_dim != 4:
            raise ValueError(
                "MODEL.ANCHOR_GENERATOR.NAME makes anchors with box_dim "
                f"{self.anchor_generator.box_dim}; PerLevelRPN handles axis-aligned boxes "
                "(use RRPN for rotated ones)"
            )
        num_levels = len(in_features)
        self.pre_nms_topk = _per_level_by_phase("PRE", pre_nms_topk, num_levels)
        for phase, k in zip(_PHASES, post_nms_topk):
            if k is None and post_nms_topk_per_level is None:
                raise ValueError(
                    f"MODEL.RPN.POST_NMS_TOPK_{phase}: post_nms_topk=None (no per-image limit) "
                    "needs post_nms_topk_per_level"
                )
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
                raise ValueError(
                    f"MODEL.RPN.POST_NMS_TOPK_{phase} must be a positive int, got {k!r}"
                )
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}
        self.post_nms_topk_per_level = None
        if post_nms_topk_per_level is not None:
            self.post_nms_topk_per_level = _per_level_by_phase(
                "POST", post_nms_topk_per_level, num_levels
            )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        require_plugin_keys(cfg, add_rpn_config, "PerLevelRPN (MODEL.RPN)")
        rpn = cfg.MODEL.RPN
        in_features = list(rpn.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"MODEL.RPN.IN_FEATURES = {in_features} must name backbone outputs "
                f"{sorted(input_shape)}; unknown: {missing}"
            )
        # Before Detectron2's RPN.from_config builds the anchor generator, which only asserts.
        check_anchor_keys(cfg, len(in_features))
        ret = super().from_config(cfg, input_shape)
        # An empty *_PER_LEVEL list means "the int key on every level".
        ret["pre_nms_topk"] = tuple(
            rpn[f"PRE_NMS_TOPK_{s}_PER_LEVEL"] or rpn[f"PRE_NMS_TOPK_{s}"] for s in _PHASES
        )
        ret.update(_post_nms_topk_args(rpn))
        ret["record_proposal_levels"] = rpn.RECORD_PROPOSAL_LEVELS
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
                decreasing order) and, in inference with ``record_proposal_levels``,
                ``proposal_levels``.
        """
        # Proposals are constants for the second stage (approximate joint training), as in
        # Detectron2.
        per_level = self.post_nms_topk_per_level
        per_level_topk: Optional[List[int]] = None
        if per_level is not None:
            per_level_topk = per_level[self.training]
        with torch.no_grad():
            pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            boxes, scores, levels, nms_counts = find_top_proposals_per_level(
                pred_proposals,
                pred_objectness_logits,
                image_sizes,
                self.nms_thresh,
                self.pre_nms_topk[self.training],
                self.post_nms_topk[self.training],
                per_level_topk,
                self.min_box_size,
                self.training,
            )
        results: List[Instances] = []
        for image_size, boxes_i, scores_i, levels_i in zip(image_sizes, boxes, scores, levels):
            res = Instances(image_size)
            res.proposal_boxes = Boxes(boxes_i)
            res.objectness_logits = scores_i
            if self.record_proposal_levels:  # a constant: TorchScript compiles this only if True
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


def _per_level_by_phase(stage: str, values, num_levels: int) -> Dict[bool, List[int]]:
    """
    ``{training: per-level ints}`` from (train, test) top-k values, each an int or a list;
    errors name the key that set the value (the *_PER_LEVEL key for a list).
    """
    out = {}
    for training, phase, value in zip((True, False), _PHASES, values):
        key = f"MODEL.RPN.{stage}_NMS_TOPK_{phase}"
        out[training] = per_level_ints(
            value, num_levels, key if isinstance(value, int) else key + "_PER_LEVEL"
        )
    return out


def _post_nms_topk_args(rpn) -> Dict[str, object]:
    """
    MODEL.RPN.POST_NMS_TOPK_MODE and the POST_NMS_TOPK keys as PerLevelRPN's two arguments:
    "per_image" -> ``post_nms_topk`` (Detectron2's meaning); "per_level" ->
    ``post_nms_topk_per_level`` (the *_PER_LEVEL lists, or the int keys on every level).
    """
    mode = rpn.POST_NMS_TOPK_MODE
    if mode == "per_level":
        return {
            "post_nms_topk": (None, None),
            "post_nms_topk_per_level": tuple(
                rpn[f"POST_NMS_TOPK_{s}_PER_LEVEL"] or rpn[f"POST_NMS_TOPK_{s}"] for s in _PHASES
            ),
        }
    if mode != "per_image":
        raise ValueError(
            f"MODEL.RPN.POST_NMS_TOPK_MODE must be one of {POST_NMS_TOPK_MODES}, got {mode!r}"
        )
    for s in _PHASES:
        per_level = rpn[f"POST_NMS_TOPK_{s}_PER_LEVEL"]
        if len(per_level):
            raise ValueError(
                f"MODEL.RPN.POST_NMS_TOPK_{s}_PER_LEVEL = {list(per_level)} needs "
                f"MODEL.RPN.POST_NMS_TOPK_MODE: per_level (it is {mode!r}, where "
                f"MODEL.RPN.POST_NMS_TOPK_{s} applies per image)"
            )
    return {
        "post_nms_topk": tuple(rpn[f"POST_NMS_TOPK_{s}"] for s in _PHASES),
        "post_nms_topk_per_level": None,
    }
