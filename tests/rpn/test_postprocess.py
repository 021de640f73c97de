"""find_top_proposals_per_level against Detectron2's find_top_rpn_proposals, and its own modes."""
import pytest
import torch
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals

from fpn_plugin.rpn.postprocess import find_top_proposals_per_level, rank_within_groups


def _random_level_outputs(level_shapes, num_images, extent, seed):
    """Per level: (N, R, 4) boxes scattered over `extent` px, (N, R) logits."""
    g = torch.Generator().manual_seed(seed)
    proposals, logits = [], []
    for h, w, a in level_shapes:
        r = h * w * a
        centers = torch.rand(num_images, r, 2, generator=g) * extent
        half = torch.rand(num_images, r, 2, generator=g) * extent / 4 + 0.2
        # Some boxes stick out of the image so that clipping matters.
        proposals.append(torch.cat([centers - half, centers + half], dim=-1))
        logits.append(torch.randn(num_images, r, generator=g))
    return proposals, logits


FPN5 = [(16, 20, 3), (8, 10, 3), (4, 5, 3), (2, 3, 3), (1, 2, 3)]
CASES = [
    # level shapes (Hi, Wi, A), image sizes, pre_nms_topk, post_nms_topk, min_size, nms_thresh
    (FPN5, [(64, 80), (50, 70)], 1000, 1000, 0.0, 0.7),
    (FPN5, [(64, 80), (50, 70)], 100, 50, 2.0, 0.5),
    ([(10, 12, 3), (5, 6, 3), (3, 3, 3)], [(40, 48), (37, 30), (12, 20)], 30, 12, 1.0, 0.3),
    ([(7, 9, 15)], [(28, 36)], 200, 40, 0.0, 0.7),  # one level (C4 RPN), 15 anchors
    ([(30, 40, 3), (15, 20, 3)], [(120, 160)], 2000, 1000, 0.0, 0.7),  # > 1000 boxes: vanilla NMS
]


@pytest.mark.parametrize("shapes, sizes, pre, post, min_size, thresh", CASES)
@pytest.mark.parametrize("training", [False, True])
def test_matches_detectron2_per_image_mode(shapes, sizes, pre, post, min_size, thresh, training):
    extent = max(max(s) for s in sizes)
    proposals, logits = _random_level_outputs(shapes, len(sizes), extent, seed=len(shapes) + pre)
    ref = find_top_rpn_proposals(proposals, logits, sizes, thresh, pre, post, min_size, training)
    boxes, scores, levels, nms_counts = find_top_proposals_per_level(
        proposals, logits, sizes, thresh, [pre] * len(shapes), post, None, min_size, training
    )
    assert len(boxes) == len(ref) == len(sizes)
    for n in range(len(sizes)):
        assert torch.equal(boxes[n], ref[n].proposal_boxes.tensor)
        assert torch.equal(scores[n], ref[n].objectness_logits)
        assert len(ref[n]) > 0
    assert nms_counts.shape == (len(sizes), len(shapes))
    assert (nms_counts.sum(dim=1) >= torch.tensor([len(b) for b in boxes])).all()


def test_levels_say_where_each_proposal_came_from():
    shapes = [(12, 12, 3), (6, 6, 3), (3, 3, 3)]
    proposals, logits = _random_level_outputs(shapes, 2, 48, seed=3)
    boxes, scores, levels, _ = find_top_proposals_per_level(
        proposals, logits, [(48, 48), (48, 48)], 0.7, [1000] * 3, 1000, None, 0.0, False
    )
    for n in range(2):
        for box, score, level in zip(boxes[n], scores[n], levels[n]):
            # The logit appears on that level (and the box, once clipped, is from that level).
            row = (logits[level][n] == score).nonzero().flatten()
            assert len(row) == 1
            assert torch.equal(proposals[level][n, row[0]].clamp(0, 48), box)


def test_per_level_mode_equals_each_level_processed_alone():
    # NMS never crosses levels, so level i's proposals in "per_level" mode are exactly what
    # Detectron2 gives for level i on its own with (pre_nms_topk[i], post_nms_topk[i]).
    shapes = [(16, 16, 3), (8, 8, 3), (4, 4, 5), (2, 2, 5)]
    sizes = [(64, 64), (60, 50)]
    pre, post = [300, 100, 40, 20], [60, 25, 10, 3]
    proposals, logits = _random_level_outputs(shapes, 2, 64, seed=7)
    boxes, scores, levels, nms_counts = find_top_proposals_per_level(
        proposals, logits, sizes, 0.6, pre, None, post, 1.0, False
    )
    for n in range(2):
        assert (scores[n][1:] <= scores[n][:-1]).all(), "merged proposals are sorted by score"
        for i in range(len(shapes)):
            ref = find_top_rpn_proposals(
                [proposals[i]], [logits[i]], sizes, 0.6, pre[i], post[i], 1.0, False
            )[n]
            mine = levels[n] == i
            assert torch.equal(boxes[n][mine], ref.proposal_boxes.tensor)
            assert torch.equal(scores[n][mine], ref.objectness_logits)
            assert int(mine.sum()) == min(post[i], int(nms_counts[n, i]))


def test_per_level_and_per_image_limits_together():
    # Two arguments, one meaning each: the per-level limits apply first, then the per-image one
    # keeps the best of what is left.
    shapes = [(16, 16, 3), (8, 8, 3), (4, 4, 3)]
    sizes = [(64, 64), (60, 50)]
    proposals, logits = _random_level_outputs(shapes, 2, 64, seed=9)
    args = (proposals, logits, sizes, 0.6, [200, 100, 40])
    per_level = find_top_proposals_per_level(*args, None, [30, 10, 5], 1.0, False)
    both = find_top_proposals_per_level(*args, 20, [30, 10, 5], 1.0, False)
    for n in range(2):
        assert len(per_level[0][n]) > 20
        for got, want in zip(both[:3], per_level[:3]):
            assert torch.equal(got[n], want[n][:20])


def test_per_level_pre_nms_topk_lists():
    shapes = [(16, 16, 3), (8, 8, 3), (4, 4, 3)]
    proposals, logits = _random_level_outputs(shapes, 1, 64, seed=11)
    pre = [50, 10, 5]
    _, _, levels, nms_counts = find_top_proposals_per_level(
        proposals, logits, [(64, 64)], 1.0, pre, 1000, None, 0.0, False
    )
    # IoU threshold 1.0 suppresses nothing: every level keeps exactly its pre-NMS top-k.
    assert nms_counts[0].tolist() == pre
    assert torch.bincount(levels[0], minlength=3).tolist() == pre


def test_non_finite_inputs_dropped_in_inference_and_fatal_in_training():
    # Ported from Detectron2's test_find_rpn_proposals_inf, then compared with it.
    g = torch.Generator().manual_seed(0)
    n, hi, wi, a = 3, 3, 3, 3
    proposals = [torch.rand(n, hi * wi * a, 4, generator=g) * 10]
    proposals[0][:, :, 2:] += proposals[0][:, :, :2]
    logits = [torch.rand(n, hi * wi * a, generator=g)]
    logits[0][0][3:5].fill_(float("inf"))
    proposals[0][0][7, 1] = float("nan")
    ref = find_top_rpn_proposals(proposals, logits, [(10, 10)], 0.5, 1000, 1000, 0, False)
    boxes, scores, _, _ = find_top_proposals_per_level(
        proposals, logits, [(10, 10)], 0.5, [1000], 1000, None, 0.0, False
    )
    assert torch.equal(boxes[0], ref[0].proposal_boxes.tensor)
    assert torch.equal(scores[0], ref[0].objectness_logits)
    assert torch.isfinite(scores[0]).all()
    with pytest.raises(FloatingPointError):
        find_top_proposals_per_level(
            proposals, logits, [(10, 10)], 0.5, [1000], 1000, None, 0.0, True
        )


@pytest.mark.parametrize("post, post_per_level", [(1000, None), (None, [300])],
                         ids=["per_image", "per_level"])
def test_tracing_generalizes_to_other_shapes(post, post_per_level):
    # Ported from Detectron2's test_find_rpn_proposals_tracing; both post-NMS top-k modes.
    n, a = 3, 9

    def func(proposal, logit, image_size):
        b, s, lv, _ = find_top_proposals_per_level(
            [proposal], [logit], [image_size], 0.7, [1000], post, post_per_level, 0.0, False
        )
        return b[0], s[0], lv[0]

    def inputs(hi, wi, size, seed):
        g = torch.Generator().manual_seed(seed)
        return (
            torch.rand(n, hi * wi * a, 4, generator=g) * size,
            torch.rand(n, hi * wi * a, generator=g),
            torch.tensor([size, size]),
        )

    traced = torch.jit.trace(
        func,
        inputs(50, 50, 100, 0),
        check_inputs=[inputs(30, 30, 60, 1), inputs(10, 10, 800, 2)],
    )
    for args in (inputs(20, 20, 90, 3), inputs(8, 8, 500, 4)):
        for got, want in zip(traced(*args), func(*args)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("post, post_per_level", [(None, [8, 4]), (10, None), (10, [8, 4])],
                         ids=["per_level", "per_image", "both"])
def test_scripted_equals_eager(post, post_per_level):
    scripted = torch.jit.script(find_top_proposals_per_level)
    shapes = [(8, 8, 3), (4, 4, 3)]
    proposals, logits = _random_level_outputs(shapes, 2, 32, seed=5)
    args = (proposals, logits, [(32, 32), (30, 20)], 0.5, [40, 20], post, post_per_level, 0.0,
            False)
    for got, want in zip(scripted(*args), find_top_proposals_per_level(*args)):
        if isinstance(got, list):
            assert all(torch.equal(x, y) for x, y in zip(got, want))
        else:
            assert torch.equal(got, want)


def test_rank_within_groups():
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    assert rank_within_groups(groups, 4).tolist() == [0, 0, 1, 0, 1, 2, 3]
    assert rank_within_groups(torch.zeros(0, dtype=torch.int64), 3).tolist() == []


def test_empty_after_filtering():
    proposals = [torch.zeros(2, 6, 4)]  # all boxes empty: nothing survives min size
    logits = [torch.randn(2, 6)]
    boxes, scores, levels, nms_counts = find_top_proposals_per_level(
        proposals, logits, [(10, 10), (10, 10)], 0.7, [10], 10, None, 0.0, False
    )
    assert [len(b) for b in boxes] == [0, 0]
    assert boxes[0].shape == (0, 4) and levels[1].dtype == torch.int64
    assert nms_counts.tolist() == [[0], [0]]
