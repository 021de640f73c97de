"""PerLevelRPNHead: StandardRPNHead parity (weights, outputs, gradients), per-level layouts,
TorchScript, config errors."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead

from jit_testutils import trace

from fpn_plugin.rpn.head import (
    PerLevelRPNHead,
    SharedConvGroupedRPNHead,
    SharedRPNHead,
    UnsharedRPNHead,
)


def _features(channels, sizes=((12, 16), (6, 8), (3, 4), (2, 2), (1, 1)), n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(channels, int):
        channels = [channels] * len(sizes)
    return [torch.randn(n, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes)]


@pytest.mark.parametrize("conv_dims", [[-1], [-1, 16], [16, -1, 8], []])
def test_same_seed_same_weights_and_outputs_as_standard_head(conv_dims):
    torch.manual_seed(5)
    ref = StandardRPNHead(in_channels=8, num_anchors=3, conv_dims=conv_dims)
    torch.manual_seed(5)
    head = PerLevelRPNHead(in_channels=8, num_anchors=3, conv_dims=conv_dims)
    ref_state, state = ref.state_dict(), head.state_dict()
    assert list(state) == list(ref_state)  # same names, same order: checkpoints load as-is
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k
    # Larger random weights than the 0.01 init, so the comparison is not of near-zeros.
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    head.load_state_dict(ref.state_dict(), strict=True)
    outputs, grads = [], []
    for module in (head, ref):
        feats = [f.requires_grad_(True) for f in _features(8)]
        logits, deltas = module(feats)
        outputs.append((logits, deltas))
        # The same random weighting of every output, backpropagated.
        g = torch.Generator().manual_seed(9)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in logits + deltas)
        loss.backward()
        grads.append(([f.grad for f in feats], {n: p.grad for n, p in module.named_parameters()}))
    for got, want in zip(*outputs):
        assert len(got) == len(want) == 5
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    (feat_grads, param_grads), (ref_feat_grads, ref_param_grads) = grads
    for g, w in zip(feat_grads, ref_feat_grads):
        assert torch.equal(g, w)
    assert param_grads.keys() == ref_param_grads.keys()
    for name, w in ref_param_grads.items():
        assert w is not None and w.abs().sum() > 0, name
        assert torch.equal(param_grads[name], w), name


def test_from_config_matches_standard_head(fpn_cfg, fpn_shapes):
    cfg = fpn_cfg()
    shapes = list(fpn_shapes(8).values())
    torch.manual_seed(0)
    ref = RPN_HEAD_REGISTRY.get("StandardRPNHead")(cfg, shapes)
    torch.manual_seed(0)
    head = RPN_HEAD_REGISTRY.get("PerLevelRPNHead")(cfg, shapes)
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), head.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_unshared_head_has_independent_weights_and_per_level_channels():
    channels = [8, 16, 16, 4, 4]
    head = PerLevelRPNHead(in_channels=channels, num_anchors=3, shared=False)
    assert len(head.level_convs) == len(head.predictors) == 5
    # Each level's head is a separate module with its own parameters.
    params = [set(map(id, m.parameters())) for m in head.level_convs]
    assert all(not (a & b) for i, a in enumerate(params) for b in params[i + 1:])
    feats = _features(channels)
    logits, deltas = head(feats)
    for f, lg, d in zip(feats, logits, deltas):
        assert lg.shape == (2, 3, *f.shape[-2:]) and d.shape == (2, 12, *f.shape[-2:])
    # Level i's output depends only on level i's weights and features.
    with torch.no_grad():
        head.level_convs[1].weight.add_(1.0)
    logits2, _ = head(feats)
    assert [torch.equal(a, b) for a, b in zip(logits, logits2)] == [True, False, True, True, True]


def test_shared_head_with_per_level_anchor_counts():
    anchors = [3, 3, 3, 3, 5]
    head = PerLevelRPNHead(in_channels=8, num_anchors=anchors)
    # One trunk; one predictor pair per distinct anchor count.
    assert head.conv is not None and getattr(head, "level_convs", None) is None
    assert len(head.predictors) == 2 and head.predictor_levels == [[0, 1, 2, 3], [4]]
    feats = _features(8)
    logits, deltas = head(feats)
    assert [x.shape[1] for x in logits] == anchors
    assert [x.shape[1] for x in deltas] == [4 * a for a in anchors]
    # Levels with the same count use the same weights: identical features, identical output.
    same = [feats[0][:, :, :2, :2]] * 4 + [feats[0][:, :, :2, :2]]
    out, _ = head(same)
    assert torch.equal(out[0], out[3])
    with pytest.raises(ValueError, match="built for 5 levels"):
        head(feats[:4])


def test_norm_and_depth():
    head = PerLevelRPNHead(in_channels=32, num_anchors=3, conv_dims=[-1, 64], norm="GN")
    assert isinstance(head.conv.conv0.norm, torch.nn.GroupNorm)
    assert head.conv.conv0.bias is None  # the norm's bias replaces the conv's
    logits, deltas = head(_features(32))
    assert logits[0].shape[1] == 3 and deltas[4].shape[1] == 12


# One case per layout (shared, shared convs with grouped predictors, unshared), and depth/norm.
LAYOUTS = {
    "shared": (dict(in_channels=8, num_anchors=3), SharedRPNHead),
    "grouped": (dict(in_channels=8, num_anchors=[3, 3, 3, 3, 5]), SharedConvGroupedRPNHead),
    "unshared": (
        dict(in_channels=[8, 16, 16, 4, 4], num_anchors=[3, 3, 3, 5, 5], shared=False),
        UnsharedRPNHead,
    ),
    "shared-GN-2convs": (
        dict(in_channels=32, num_anchors=3, conv_dims=[-1, -1], norm="GN"), SharedRPNHead
    ),
}


@pytest.mark.parametrize("kwargs, layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_scripted_head_equals_eager(kwargs, layout):
    head = PerLevelRPNHead(**kwargs).eval()
    assert type(head) is layout
    scripted = torch.jit.script(head)
    feats = _features(kwargs["in_channels"])
    for got, want in zip(scripted(feats), head(feats)):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("kwargs, layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_traced_head_equals_eager_at_other_sizes(kwargs, layout):
    head = PerLevelRPNHead(**kwargs).eval()
    traced = trace(head, (_features(kwargs["in_channels"]),))
    other_sizes = ((20, 8), (10, 4), (5, 2), (3, 1), (2, 1))
    for feats in (_features(kwargs["in_channels"], seed=1),
                  _features(kwargs["in_channels"], sizes=other_sizes, n=1, seed=2)):
        for got, want in zip(traced(feats), head(feats)):
            assert len(got) == len(want) == 5
            for g, w in zip(got, want):
                assert torch.equal(g, w)


def test_config_errors_name_the_key(fpn_cfg, fpn_shapes):
    build = RPN_HEAD_REGISTRY.get("PerLevelRPNHead")
    shapes = list(fpn_shapes(8).values())
    mixed = [ShapeSpec(channels=c, stride=s.stride) for c, s in zip([8, 8, 16, 8, 8], shapes)]
    with pytest.raises(ValueError, match=r"MODEL.RPN.SHARED_HEAD.*\[8, 8, 16, 8, 8\]"):
        build(fpn_cfg(), mixed)
    cfg = fpn_cfg()
    cfg.MODEL.RPN.SHARED_HEAD = False
    assert len(build(cfg, mixed).level_convs) == 5  # fine with a head per level

    cfg = fpn_cfg()
    cfg.MODEL.RPN.HEAD_NORM = "NoSuchNorm"
    with pytest.raises(ValueError, match="MODEL.RPN.HEAD_NORM.*NoSuchNorm"):
        build(cfg, shapes)
    cfg.MODEL.RPN.HEAD_NORM = "GN"  # 8 channels cannot form 32 groups
    with pytest.raises(ValueError, match="MODEL.RPN.HEAD_NORM = 'GN'"):
        build(cfg, shapes)
    cfg = fpn_cfg()
    cfg.MODEL.RPN.CONV_DIMS = [-1, 0]
    with pytest.raises(ValueError, match=r"MODEL.RPN.CONV_DIMS.*\[-1, 0\]"):
        build(cfg, shapes)
    cfg = fpn_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]] * 3
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"):
        build(cfg, shapes)
