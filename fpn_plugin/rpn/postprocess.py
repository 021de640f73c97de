"""
Per-level proposal selection (pure tensor code, no Detectron2 structures).

Shape shorthand:
    N: images in the batch; L: pyramid levels; Ri = Hi * Wi * Ai: anchors on level i;
    K = sum_i min(Ri, pre_nms_topk[i]): candidates kept before NMS, per image.

The pipeline for a batch (see docs/rpn.md for the diagram):

1. per level i: the ``pre_nms_topk[i]`` highest objectness logits of each image;
2. all levels concatenated; boxes clipped to their image; non-finite and small boxes dropped;
3. ONE ``batched_nms`` over the whole batch, keyed by (image, level): boxes of different
   levels or images never suppress each other;
4. post-NMS top-k: per (image, level) if asked, and per image over the merged levels
   (Detectron2) if asked;
5. per image, the survivors in decreasing objectness.

With ``pre_nms_topk`` the same on every level and per-image post-NMS top-k this selects
exactly what Detectron2's ``find_top_rpn_proposals`` selects (it loops over images and runs
one ``batched_nms`` per image); see :func:`find_top_proposals_per_level` for the tie caveat.

Index tensors made here (image and level ids, per-level limits) are created on the CPU while
tracing and moved to the input's device by :func:`_to_device_of`, so a traced model carries no
device of its own and runs on whatever device its inputs are on (as Detectron2 main does).
"""
from typing import List, Optional, Tuple

import torch
from detectron2.layers import batched_nms

__all__ = ["find_top_proposals_per_level", "rank_within_groups"]


def _index_device(like: torch.Tensor) -> torch.device:
    """Where to create index tensors: ``like``'s device, or the CPU while tracing (the tracer
    would record ``like.device`` as a constant)."""
    if torch.jit.is_scripting():
        return like.device
    if torch.jit.is_tracing():
        return torch.device("cpu")
    return like.device


@torch.jit.script_if_tracing
def _to_device_of(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` on ``like``'s device; scripted while tracing, so the device stays an input of
    the graph instead of a constant. A no-op when they already share it."""
    return src.to(like.device)


def rank_within_groups(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """
    Position of every element among the elements of its group, keeping the input order.

    Args:
        groups (Tensor): (M,) int64 group ids in [0, num_groups), e.g. NMS survivors' (image,
            level) keys listed in decreasing score.
        num_groups (int): number of possible group ids.

    Returns:
        Tensor: (M,) int64; element j gets the number of earlier elements with its group id.
            So ``rank < k`` keeps the first k of every group (the top-k for score-sorted input).
    """
    num = groups.numel()
    device = _index_device(groups)
    positions = _to_device_of(torch.arange(num, device=device), groups)
    # Sorting by (group, position) lines the groups up and keeps each group's elements in input
    # order: a stable sort by group, in ops ONNX exports (no `stable=True`, no bincount).
    order = torch.argsort(groups * num + positions)
    sorted_groups = groups[order]
    zeros = _to_device_of(torch.zeros(num_groups, dtype=torch.int64, device=device), groups)
    counts = zeros.scatter_add(0, groups, torch.ones_like(groups))
    starts = torch.cumsum(counts, dim=0) - counts
    rank_sorted = positions - starts[sorted_groups]
    ranks = torch.empty_like(rank_sorted)
    ranks[order] = rank_sorted
    return ranks


def find_top_proposals_per_level(
    proposals: List[torch.Tensor],
    pred_objectness_logits: List[torch.Tensor],
    image_sizes: List[Tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: List[int],
    post_nms_topk: Optional[int],
    post_nms_topk_per_level: Optional[List[int]],
    min_box_size: float,
    training: bool,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """
    Select proposals level by level and merge the levels (the FPN RPN's post-processing).

    Args:
        proposals (list[Tensor]): L tensors; tensor i is (N, Ri, 4) decoded boxes (XYXY,
            input-image pixels) of level i.
        pred_objectness_logits (list[Tensor]): L tensors; tensor i is (N, Ri).
        image_sizes (list[tuple[int, int]]): (h, w) of each image. Only the first
            ``len(image_sizes)`` images of the batch are processed.
        nms_thresh (float): IoU above which NMS removes the lower-scoring box of a pair (only
            within one level of one image).
        pre_nms_topk (list[int]): L ints; candidates per image taken from level i before NMS.
        post_nms_topk (int or None): after NMS, the number of survivors kept per image over
            all levels (Detectron2's meaning); None: no per-image limit.
        post_nms_topk_per_level (list[int] or None): after NMS, L ints: the number of
            survivors of level i kept per image (applied before ``post_nms_topk``); None: no
            per-level limit.
        min_box_size (float): boxes with a side (after clipping) not above this are dropped.
        training (bool): non-finite boxes or scores raise ``FloatingPointError`` in training;
            in inference they are dropped.

    Returns:
        list[Tensor]: N tensors (Pn, 4), the proposal boxes of image n, clipped to it,
            in decreasing objectness.
        list[Tensor]: N tensors (Pn,), their objectness logits.
        list[Tensor]: N int64 tensors (Pn,), the level index (into ``proposals``) each came from.
        Tensor: (N, L) int64, the number of boxes of each image and level that survived NMS
            (before the post-NMS top-k).

    Exact ties in objectness may be ordered differently from Detectron2's per-image loop (the
    relative order of equal scores is not defined by either implementation); everything else
    is identical for the same inputs.
    """
    num_images = len(image_sizes)
    num_levels = len(proposals)
    like = proposals[0]
    device = _index_device(like)
    batch_idx = _to_device_of(torch.arange(num_images, device=device), like)

    # 1. Top-k candidates of every level (a loop over levels, never over boxes).
    scores, boxes, levels = _top_candidates_per_level(
        proposals, pred_objectness_logits, num_images, batch_idx, pre_nms_topk)
    # 2. Clip each image's boxes to that image, then flatten the batch so the remaining steps
    # are single tensor ops over all images; drop non-finite and small boxes.
    flat_boxes = _clip_to_images(boxes, image_sizes)  # (N*K, 4)
    flat_scores = scores.reshape(-1)
    image_ids = batch_idx[:, None].expand_as(scores).reshape(-1)
    flat_levels = levels[None, :].expand_as(scores).reshape(-1)
    candidates = _usable_candidates(boxes, flat_boxes, flat_scores, min_box_size, training)

    # 3. One NMS for the batch; the (image, level) key keeps images and levels apart.
    groups = image_ids[candidates] * num_levels + flat_levels[candidates]
    keep = batched_nms(flat_boxes[candidates], flat_scores[candidates], groups, nms_thresh)
    kept = candidates[keep]  # in decreasing score over the whole batch
    kept_groups = groups[keep]
    nms_counts = torch.bincount(kept_groups, minlength=num_images * num_levels).view(
        num_images, num_levels
    )

    # 4. Post-NMS top-k per (image, level); the per-image top-k is a prefix, taken below.
    if post_nms_topk_per_level is not None:
        limits = _to_device_of(
            torch.tensor(post_nms_topk_per_level, dtype=torch.int64, device=device), like
        )
        ranks = rank_within_groups(kept_groups, num_images * num_levels)
        kept = kept[ranks < limits[flat_levels[kept]]]

    # 5. Split by image; masking keeps the batch-wide score order within each image.
    out_boxes, out_scores, out_levels = _split_by_image(
        kept, image_ids, (flat_boxes, flat_scores, flat_levels), num_images, post_nms_topk)
    return out_boxes, out_scores, out_levels, nms_counts


def _top_candidates_per_level(
    proposals: List[torch.Tensor],
    pred_objectness_logits: List[torch.Tensor],
    num_images: int,
    batch_idx: torch.Tensor,
    pre_nms_topk: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The ``pre_nms_topk[i]`` highest logits of each image on every level i, levels concatenated.

    Args:
        batch_idx (Tensor): (N,) int64 ``0..N-1``, on the boxes' device.

    Returns:
        (N, K) scores, (N, K, 4) boxes, (K,) int64 level of each column.
    """
    like = proposals[0]
    device = _index_device(like)
    top_scores: List[torch.Tensor] = []
    top_boxes: List[torch.Tensor] = []
    top_levels: List[torch.Tensor] = []
    for level, (boxes_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
        logits_i = logits_i[:num_images]
        num_anchors = logits_i.shape[1]
        if isinstance(num_anchors, torch.Tensor):  # a size is a tensor while tracing
            k = torch.clamp(num_anchors, max=pre_nms_topk[level])
        else:
            k = min(num_anchors, pre_nms_topk[level])
        scores_i, idx = logits_i.topk(k, dim=1)
        top_scores.append(scores_i)
        top_boxes.append(boxes_i[batch_idx[:, None], idx])
        top_levels.append(
            _to_device_of(torch.full((k,), level, dtype=torch.int64, device=device), like)
        )
    return torch.cat(top_scores, dim=1), torch.cat(top_boxes, dim=1), torch.cat(top_levels, dim=0)


def _clip_to_images(boxes: torch.Tensor, image_sizes: List[Tuple[int, int]]) -> torch.Tensor:
    """(N, K, 4) boxes, each image's clipped to it (the clamps of ``Boxes.clip``) -> (N*K, 4)."""
    clipped: List[torch.Tensor] = []
    for n, image_size in enumerate(image_sizes):
        h, w = image_size[0], image_size[1]
        b = boxes[n]
        clipped.append(
            torch.stack(
                (
                    b[:, 0].clamp(min=0, max=w),
                    b[:, 1].clamp(min=0, max=h),
                    b[:, 2].clamp(min=0, max=w),
                    b[:, 3].clamp(min=0, max=h),
                ),
                dim=-1,
            )
        )
    return torch.cat(clipped, dim=0)


def _usable_candidates(boxes: torch.Tensor, flat_boxes: torch.Tensor, flat_scores: torch.Tensor,
                       min_box_size: float, training: bool) -> torch.Tensor:
    """
    Indices into the flattened batch of the finite boxes with both sides above
    ``min_box_size``. Validity is judged on the unclipped ``boxes`` (N, K, 4): clipping would
    turn inf into a border. In training a non-finite box or score raises instead.
    """
    valid = torch.isfinite(boxes.reshape(-1, 4)).all(dim=1) & torch.isfinite(flat_scores)
    if training and not bool(valid.all()):
        raise FloatingPointError(
            "Predicted boxes or scores contain Inf/NaN. Training has diverged."
        )
    widths = flat_boxes[:, 2] - flat_boxes[:, 0]
    heights = flat_boxes[:, 3] - flat_boxes[:, 1]
    return torch.nonzero(
        valid & (widths > min_box_size) & (heights > min_box_size)
    ).squeeze(1)


def _split_by_image(
    kept: torch.Tensor,
    image_ids: torch.Tensor,
    flat: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_images: int,
    post_nms_topk: Optional[int],
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """The ``kept`` entries of the flattened (boxes, scores, levels), split by image in their
    order, at most ``post_nms_topk`` per image."""
    flat_boxes, flat_scores, flat_levels = flat
    kept_images = image_ids[kept]
    out_boxes: List[torch.Tensor] = []
    out_scores: List[torch.Tensor] = []
    out_levels: List[torch.Tensor] = []
    for n in range(num_images):
        idx = kept[kept_images == n]
        if post_nms_topk is not None:
            idx = idx[:post_nms_topk]
        out_boxes.append(flat_boxes[idx])
        out_scores.append(flat_scores[idx])
        out_levels.append(flat_levels[idx])
    return out_boxes, out_scores, out_levels
