"""PerLevelRPN against Detectron2's RPN (same weights, inputs, seeds: losses, gradients,
proposals), options, statistics."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_backbone
from detectron2.modeling.proposal_generator import RPN, build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from jit_testutils import scripting_with_instances, trace

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.deploy import plugin_fields
from fpn_plugin.rpn import PerLevelRPN


def _use_plugin(cfg):
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PerLevelRPN"
    cfg.MODEL.RPN.HEAD_NAME = "PerLevelRPNHead"
    return cfg


def _gt(image_sizes, seed, num_boxes=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in image_sizes:
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 4
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        out.append(inst)
    return out


def _images(image_sizes, divisibility=64):
    h = -(-max(s[0] for s in image_sizes) // divisibility) * divisibility
    w = -(-max(s[1] for s in image_sizes) // divisibility) * divisibility
    return ImageList(torch.zeros(len(image_sizes), 3, h, w), list(image_sizes)), (h, w)


def _randomize(module, seed):
    """Weights far from the 0.01-std init, so objectness ranks and NMS are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "anchor_deltas" in name else 0.3))


def _assert_same_proposals(mine, ref, with_levels):
    assert len(mine) == len(ref)
    for m, r in zip(mine, ref):
        assert m.image_size == r.image_size
        assert len(r) > 0
        assert torch.equal(m.proposal_boxes.tensor, r.proposal_boxes.tensor)
        assert torch.equal(m.objectness_logits, r.objectness_logits)
        assert m.has("proposal_levels") == with_levels


def test_ported_detectron2_rpn_case():
    # Detectron2's tests/modeling/test_rpn.py::test_rpn (C4 backbone, one level), with the
    # plugin in the RPN's place: same seed, same construction order -> the same weights,
    # inputs and label sampling, so the same expected numbers as upstream and as the built-in.
    results = {}
    for name in ("builtin", "plugin"):
        torch.manual_seed(121)
        cfg = get_cfg()
        add_fpn_plugin_config(cfg)
        backbone = build_backbone(cfg)
        if name == "builtin":
            proposal_generator = RPN(cfg, backbone.output_shape())
        else:
            proposal_generator = PerLevelRPN(_use_plugin(cfg), backbone.output_shape())
        num_images = 2
        images_tensor = torch.rand(num_images, 20, 30)
        image_sizes = [(10, 10), (20, 30)]
        images = ImageList(images_tensor, image_sizes)
        features = {"res4": torch.rand(num_images, 1024, 1, 2)}
        gt_instances = Instances((15, 15))
        gt_instances.gt_boxes = Boxes(
            torch.tensor([[1, 1, 3, 3], [2, 2, 6, 6]], dtype=torch.float32)
        )
        with EventStorage():
            results[name] = proposal_generator(images, features, [gt_instances[0], gt_instances[1]])
    (props, losses), (ref_props, ref_losses) = results["plugin"], results["builtin"]
    assert losses.keys() == ref_losses.keys()
    for k in losses:
        assert torch.equal(losses[k], ref_losses[k])
    _assert_same_proposals(props, ref_props, with_levels=False)
    # Upstream's expected values.
    assert torch.allclose(losses["loss_rpn_cls"], torch.tensor(0.08011703193))
    assert torch.allclose(losses["loss_rpn_loc"], torch.tensor(0.101470276))
    expected_boxes = torch.tensor([[0, 0, 10, 10], [7.2702, 0, 10, 10]])
    assert torch.allclose(props[0].proposal_boxes.tensor, expected_boxes, atol=1e-4)
    assert torch.allclose(props[0].objectness_logits, torch.tensor([0.1596, -0.0007]), atol=1e-4)


FPN_CASES = [
    # image sizes, (pre train, pre test), (post train, post test)
    ([(64, 80), (50, 70)], (2000, 1000), (1000, 1000)),
    ([(100, 60)], (2000, 1000), (1000, 1000)),
    ([(33, 47), (64, 64), (20, 90)], (60, 40), (50, 20)),
    ([(128, 96), (120, 128)], (300, 200), (100, 60)),
]


@pytest.mark.parametrize("image_sizes, pre, post", FPN_CASES)
def test_fpn_parity_training_and_inference(
    image_sizes, pre, post, fpn_cfg, fpn_shapes, fpn_features
):
    cfg = fpn_cfg()
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = pre
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = post
    shapes = fpn_shapes(8)
    ref = build_proposal_generator(cfg, shapes)
    assert type(ref) is RPN
    _randomize(ref, seed=len(image_sizes))
    mine = build_proposal_generator(_use_plugin(cfg.clone()), shapes)
    assert type(mine) is PerLevelRPN
    incompatible = mine.load_state_dict(ref.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    images, padded = _images(image_sizes)
    features = fpn_features(padded, num_images=len(image_sizes), channels=8, seed=1)
    gt = _gt(image_sizes, seed=2)

    for module in (ref, mine):
        module.train()
    outputs, grads = {}, {}
    for name, module in (("ref", ref), ("mine", mine)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in features.items()}
        torch.manual_seed(42)  # label sampling draws from the global RNG
        with EventStorage() as storage:
            outputs[name] = module(images, leaves, gt) + (storage.latest(),)
        outputs[name] += (torch.get_rng_state(),)
        sum(outputs[name][1].values()).backward()
        grads[name] = ({k: v.grad for k, v in leaves.items()},
                       {n: p.grad for n, p in module.named_parameters()})
    (props, losses, stats, rng), (ref_props, ref_losses, ref_stats, ref_rng) = (
        outputs["mine"], outputs["ref"])
    assert losses.keys() == ref_losses.keys() == {"loss_rpn_cls", "loss_rpn_loc"}
    for k in losses:
        assert torch.equal(losses[k], ref_losses[k]), k
        assert losses[k] > 0
    assert torch.equal(rng, ref_rng)  # the sampler drew as many random numbers
    # Training gradients: of every pyramid level and of every head parameter.
    (feat_grads, param_grads), (ref_feat_grads, ref_param_grads) = grads["mine"], grads["ref"]
    for k, w in ref_feat_grads.items():
        assert w.abs().sum() > 0 and torch.equal(feat_grads[k], w), k
    assert param_grads.keys() == ref_param_grads.keys()
    for k, w in ref_param_grads.items():
        assert w is not None and torch.equal(param_grads[k], w), k
    _assert_same_proposals(props, ref_props, with_levels=False)
    for k in ("rpn/num_pos_anchors", "rpn/num_neg_anchors"):
        assert stats[k][0] == ref_stats[k][0]

    for module in (ref, mine):
        module.eval()
    with torch.no_grad():
        props, losses = mine(images, features)
        ref_props, ref_losses = ref(images, features)
    assert losses == ref_losses == {}
    # By default the proposals have Detectron2's fields only (the model scripts with its list).
    _assert_same_proposals(props, ref_props, with_levels=False)
    # MODEL.RPN.RECORD_PROPOSAL_LEVELS adds the level of each inference proposal.
    levels_cfg = _use_plugin(cfg.clone())
    levels_cfg.MODEL.RPN.RECORD_PROPOSAL_LEVELS = True
    recording = build_proposal_generator(levels_cfg, shapes).eval()
    recording.load_state_dict(mine.state_dict())
    with torch.no_grad():
        props = recording(images, features)[0]
    _assert_same_proposals(props, ref_props, with_levels=True)
    for p in props:
        assert p.proposal_levels.dtype == torch.int64
        assert set(p.proposal_levels.tolist()) <= set(range(5))


def test_per_level_statistics_in_event_storage(fpn_cfg, fpn_shapes, fpn_features):
    cfg = _use_plugin(fpn_cfg())
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 60
    rpn = build_proposal_generator(cfg, fpn_shapes(8)).train()
    _randomize(rpn, seed=0)
    sizes = [(96, 96), (80, 64)]
    images, padded = _images(sizes)
    with EventStorage() as storage:
        proposals, _ = rpn(images, fpn_features(padded, 2, 8, seed=3), _gt(sizes, seed=4))
        latest = {k: v[0] for k, v in storage.latest().items()}
    levels = ["p2", "p3", "p4", "p5", "p6"]
    for what in ("num_pos_anchors", "num_neg_anchors"):
        per_level = [latest[f"rpn/{what}_{f}"] for f in levels]
        assert sum(per_level) == pytest.approx(latest[f"rpn/{what}"])  # Detectron2's total
    assert sum(latest[f"rpn/num_pos_anchors_{f}"] for f in levels) > 0
    kept = [latest[f"rpn/num_proposals_{f}"] for f in levels]
    assert sum(kept) == pytest.approx(sum(len(p) for p in proposals) / 2)
    for f in levels:
        assert latest[f"rpn/num_proposals_{f}"] <= latest[f"rpn/num_proposals_after_nms_{f}"]


def test_unshared_heads_and_per_level_anchor_counts(fpn_cfg, fpn_shapes, fpn_features):
    cfg = _use_plugin(fpn_cfg())
    cfg.MODEL.RPN.SHARED_HEAD = False
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]] * 4 + [[0.25, 0.5, 1.0, 2.0, 4.0]]
    cfg.MODEL.RPN.POST_NMS_TOPK_MODE = "per_level"
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST_PER_LEVEL = [30, 20, 10, 5, 5]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST_PER_LEVEL = [200, 100, 50, 50, 50]
    cfg.MODEL.RPN.RECORD_PROPOSAL_LEVELS = True
    rpn = build_proposal_generator(cfg, fpn_shapes(8))
    assert rpn.anchor_generator.num_anchors == [3, 3, 3, 3, 5]
    assert len(rpn.rpn_head.level_convs) == 5
    _randomize(rpn, seed=1)
    sizes = [(128, 128), (96, 128)]
    images, padded = _images(sizes)
    features = fpn_features(padded, 2, 8, seed=5)
    with EventStorage():
        _, losses = rpn.train()(images, features, _gt(sizes, seed=6))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    proposals, _ = rpn.eval()(images, features)
    for p in proposals:
        counts = torch.bincount(p.proposal_levels, minlength=5).tolist()
        assert all(c <= k for c, k in zip(counts, [30, 20, 10, 5, 5]))
        assert counts[0] == 30  # plenty of P2 candidates survive NMS
        assert (p.objectness_logits[1:] <= p.objectness_logits[:-1]).all()


def _build(cfg, shapes):
    return build_proposal_generator(cfg, shapes)


BAD_CONFIGS = [
    ({"MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128]]}, r"ANCHOR_GENERATOR.SIZES.*3 per-level"),
    ({"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[1.0], [1.0]]}, "ANCHOR_GENERATOR.ASPECT_RATIOS"),
    ({"MODEL.RPN.PRE_NMS_TOPK_TRAIN_PER_LEVEL": [10] * 4}, r"PRE_NMS_TOPK_TRAIN_PER_LEVEL has 4"),
    ({"MODEL.RPN.PRE_NMS_TOPK_TEST_PER_LEVEL": [10, 10, 0, 10, 10]}, "PRE_NMS_TOPK_TEST_PER_LEVEL"),
    (
        {"MODEL.RPN.POST_NMS_TOPK_TEST_PER_LEVEL": [5] * 5},
        r"POST_NMS_TOPK_TEST_PER_LEVEL.*needs MODEL.RPN.POST_NMS_TOPK_MODE",
    ),
    (
        {
            "MODEL.RPN.POST_NMS_TOPK_MODE": "per_level",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN_PER_LEVEL": [5] * 6,
        },
        r"MODEL.RPN.POST_NMS_TOPK_TRAIN_PER_LEVEL has 6",
    ),
    ({"MODEL.RPN.POST_NMS_TOPK_MODE": "per_batch"}, r"MODEL.RPN.POST_NMS_TOPK_MODE.*per_batch"),
    ({"MODEL.RPN.IN_FEATURES": ["p2", "p9"]}, r"MODEL.RPN.IN_FEATURES.*p9"),
    ({"MODEL.RPN.SHARED_HEAD": "yes"}, "MODEL.RPN.SHARED_HEAD"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS)
def test_bad_config_raises_value_error_naming_the_key(
    overrides, message, fpn_cfg, fpn_shapes, set_key
):
    cfg = _use_plugin(fpn_cfg())
    for k, v in overrides.items():
        set_key(cfg, k, v)
    with pytest.raises(ValueError, match=message):
        _build(cfg, fpn_shapes(8))


def test_per_level_topk_lists_reach_the_module(fpn_cfg, fpn_shapes):
    cfg = _use_plugin(fpn_cfg())
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN_PER_LEVEL = [2000, 1000, 500, 200, 100]
    cfg.MODEL.RPN.POST_NMS_TOPK_MODE = "per_level"
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST_PER_LEVEL = [300, 200, 100, 50, 50]
    rpn = _build(cfg, fpn_shapes(8))
    assert rpn.pre_nms_topk == {True: [2000, 1000, 500, 200, 100], False: [1000] * 5}
    assert rpn.post_nms_topk_per_level == {True: [1000] * 5, False: [300, 200, 100, 50, 50]}
    assert rpn.post_nms_topk == {True: None, False: None}  # no per-image limit on top


# Each head layout and post-NMS top-k mode once; the FPN ones record proposal levels.
JIT_LAYOUTS = ["c4_default", "fpn_unshared_per_level", "fpn_grouped_per_image"]
# Detectron2's field list for an RPN (upstream's test_rpn_scriptability).
RPN_FIELDS = {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor}


def _jit_rpn(layout):
    """An eval-mode PerLevelRPN with random weights, and its backbone shapes."""
    cfg = _use_plugin(get_cfg())
    add_fpn_plugin_config(cfg)
    if layout == "c4_default":  # upstream's test_rpn_scriptability case
        shapes = {"res4": ShapeSpec(channels=64, stride=16)}
    else:
        cfg.MODEL.RPN.RECORD_PROPOSAL_LEVELS = True
        shapes = {f"p{i}": ShapeSpec(channels=16, stride=2 ** i) for i in range(2, 7)}
        cfg.MODEL.RPN.IN_FEATURES = list(shapes)
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]] * 4 + [
            [0.25, 0.5, 1.0, 2.0, 4.0]
        ]
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 40
        if layout == "fpn_unshared_per_level":
            cfg.MODEL.RPN.SHARED_HEAD = False
            cfg.MODEL.RPN.POST_NMS_TOPK_MODE = "per_level"
    rpn = build_proposal_generator(cfg, shapes).eval()
    _randomize(rpn, seed=0)
    return rpn, shapes


def _jit_features(shapes, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.rand(2, s.channels, -(-hw[0] // s.stride), -(-hw[1] // s.stride), generator=g)
        for k, s in shapes.items()
    }


@pytest.mark.parametrize("layout", JIT_LAYOUTS)
def test_scripted_rpn_equals_eager(layout):
    rpn, shapes = _jit_rpn(layout)
    images = ImageList(torch.rand(2, 3, 64, 64), [(64, 64), (50, 60)])
    features = _jit_features(shapes, (65, 65))
    # The default scripts with Detectron2's own list; recording levels needs the extra field.
    fields = plugin_fields(rpn) if rpn.record_proposal_levels else RPN_FIELDS
    assert ("proposal_levels" in fields) == (layout != "c4_default")
    scripted = scripting_with_instances(rpn, fields)
    for p, q in zip(rpn(images, features)[0], scripted(images, features)[0]):
        assert len(p) > 0
        assert torch.equal(p.proposal_boxes.tensor, q.proposal_boxes.tensor)
        assert torch.equal(p.objectness_logits, q.objectness_logits)
        assert p.has("proposal_levels") == rpn.record_proposal_levels
        if rpn.record_proposal_levels:
            assert torch.equal(p.proposal_levels, q.proposal_levels)


def test_recorded_levels_need_the_field_to_script():
    rpn, _ = _jit_rpn("fpn_grouped_per_image")
    with pytest.raises(Exception, match="proposal_levels"):
        scripting_with_instances(rpn, RPN_FIELDS)


class _ProposalTensors(torch.nn.Module):
    """The RPN with tensors in and out (what tracing needs): image sizes as an (N, 2) tensor,
    as in a traced Detectron2 model, so they are inputs of the trace, not constants."""

    def __init__(self, rpn, names):
        super().__init__()
        self.rpn = rpn
        self.names = names

    def forward(self, images, image_sizes, *features):
        sizes = [image_sizes[i] for i in range(image_sizes.shape[0])]
        proposals, _ = self.rpn(ImageList(images, sizes), dict(zip(self.names, features)))
        out = ([p.proposal_boxes.tensor for p in proposals],
               [p.objectness_logits for p in proposals])
        if self.rpn.record_proposal_levels:
            out += ([p.proposal_levels for p in proposals],)
        return out


@pytest.mark.parametrize("layout", JIT_LAYOUTS)
def test_traced_rpn_equals_eager_at_other_sizes(layout):
    rpn, shapes = _jit_rpn(layout)
    wrapper = _ProposalTensors(rpn, list(shapes))

    def inputs(hw, seed):
        sizes = torch.tensor([hw, (hw[0] - 10, hw[1] - 4)])
        images = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(seed))
        return (images, sizes) + tuple(_jit_features(shapes, hw, seed).values())

    with torch.no_grad():
        traced = trace(wrapper, inputs((64, 64), 0))
        for hw, seed in (((64, 64), 1), ((64, 128), 2)):
            args = inputs(hw, seed)
            eager = wrapper(*args)
            # Tensor image sizes select what plain (h, w) tuples select.
            plain = rpn(ImageList(args[0], [tuple(s) for s in args[1].tolist()]),
                        dict(zip(shapes, args[2:])))[0]
            for boxes, ref in zip(eager[0], plain):
                assert len(boxes) > 0
                assert torch.equal(boxes, ref.proposal_boxes.tensor)
            for got, want in zip(traced(*args), eager):  # boxes, logits[, levels]
                assert all(torch.equal(g, w) for g, w in zip(got, want))
