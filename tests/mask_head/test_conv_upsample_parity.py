"""
ConvUpsampleMaskHead against Detectron2's MaskRCNNConvUpsampleHead: same weights, same inputs
-> identical logits, loss (mask_rcnn_loss), gradients and pred_masks; checkpoints load both ways.
"""
import copy

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.utils.events import EventStorage
from mask_head_testutils import (
    BOXES,
    HeadLayers,
    inference_instances,
    mask_cfg,
    randomize_,
    training_instances,
)

IN_SHAPE = ShapeSpec(channels=8, height=7, width=7)


def _pair(cls_agnostic, norm="", num_conv=2, conv_dim=16):
    kw = dict(num_conv=num_conv, conv_dim=conv_dim, CLS_AGNOSTIC_MASK=cls_agnostic, NORM=norm)
    theirs = build_mask_head(mask_cfg("MaskRCNNConvUpsampleHead", **kw), IN_SHAPE)
    ours = build_mask_head(mask_cfg("ConvUpsampleMaskHead", **kw), IN_SHAPE)
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _features(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN_SHAPE.channels, IN_SHAPE.height, IN_SHAPE.width, generator=gen)


@pytest.mark.parametrize("norm", ["", "GN", "BN"])
@pytest.mark.parametrize("num_conv", [0, 1, 4])
def test_state_dict_keys_match_detectron2_both_ways(norm, num_conv):
    kw = dict(num_conv=num_conv, conv_dim=32, NORM=norm)
    theirs = build_mask_head(mask_cfg("MaskRCNNConvUpsampleHead", **kw), IN_SHAPE)
    ours = build_mask_head(mask_cfg("ConvUpsampleMaskHead", **kw), IN_SHAPE)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    # strict loads report missing/unexpected keys as errors
    ours.load_state_dict(randomize_(theirs).state_dict(), strict=True)
    theirs.load_state_dict(randomize_(ours, seed=5).state_dict(), strict=True)


@pytest.mark.parametrize("norm", ["", "GN"])
def test_same_seed_gives_detectron2s_initial_weights(norm):
    kw = dict(num_conv=3, conv_dim=32, NORM=norm)
    torch.manual_seed(7)
    theirs = build_mask_head(mask_cfg("MaskRCNNConvUpsampleHead", **kw), IN_SHAPE)
    torch.manual_seed(7)
    ours = build_mask_head(mask_cfg("ConvUpsampleMaskHead", **kw), IN_SHAPE)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("cls_agnostic", [False, True])
def test_logits_loss_and_gradients_match(cls_agnostic):
    theirs, ours = _pair(cls_agnostic)
    instances = training_instances(BOXES, num_classes=3)
    n = sum(len(i) for i in instances)
    x_theirs = _features(n).requires_grad_(True)
    x_ours = x_theirs.detach().clone().requires_grad_(True)

    logits = ours.layers(x_ours)
    assert logits.shape == (n, 1 if cls_agnostic else 3, 14, 14)
    assert torch.equal(logits, theirs.layers(x_theirs))

    theirs.train()
    ours.train()
    with EventStorage():
        loss_theirs = theirs(x_theirs, instances)["loss_mask"]
        loss_ours = ours(x_ours, instances)["loss_mask"]
    # A loss of log(2) would mean the masks were never compared; the weights are randomized.
    assert abs(loss_ours.item() - 0.6931) > 1e-2
    assert torch.equal(loss_ours, loss_theirs)

    loss_theirs.backward()
    loss_ours.backward()
    assert torch.equal(x_ours.grad, x_theirs.grad)
    grads_theirs = {k: p.grad for k, p in theirs.named_parameters()}
    for k, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
        assert torch.equal(p.grad, grads_theirs[k]), k


@pytest.mark.parametrize("cls_agnostic", [False, True])
def test_inference_pred_masks_match(cls_agnostic):
    theirs, ours = _pair(cls_agnostic)
    theirs.eval()
    ours.eval()
    inst_theirs = inference_instances(BOXES, num_classes=3)
    inst_ours = inference_instances(BOXES, num_classes=3)
    x = _features(sum(len(i) for i in inst_ours))
    with torch.no_grad():
        theirs(x, inst_theirs)
        out = ours(x, inst_ours)
    assert out is inst_ours
    for a, b in zip(inst_ours, inst_theirs):
        assert a.pred_masks.shape == (len(a), 1, 14, 14)
        assert torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("norm", ["GN", "BN"])
def test_norm_head_matches_in_training_and_eval(norm):
    theirs, ours = _pair(False, norm=norm, conv_dim=32)
    instances = training_instances(BOXES, num_classes=3)
    n = sum(len(i) for i in instances)

    # Training mode (BN: batch statistics): loss, gradients, updated running statistics.
    theirs.train()
    ours.train()
    x_theirs = _features(n).requires_grad_(True)
    x_ours = x_theirs.detach().clone().requires_grad_(True)
    with EventStorage():
        loss_theirs = theirs(x_theirs, instances)["loss_mask"]
        loss_ours = ours(x_ours, instances)["loss_mask"]
    assert torch.equal(loss_ours, loss_theirs)
    loss_theirs.backward()
    loss_ours.backward()
    assert torch.equal(x_ours.grad, x_theirs.grad)
    grads_theirs = {k: p.grad for k, p in theirs.named_parameters()}
    for k, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
        assert torch.equal(p.grad, grads_theirs[k]), k
    state_theirs = theirs.state_dict()
    for k, v in ours.state_dict().items():  # BN's running mean/var moved alike
        assert torch.equal(v, state_theirs[k]), k

    # Eval mode (BN: the running statistics): logits and pred_masks.
    theirs.eval()
    ours.eval()
    x = _features(n, seed=2)
    with torch.no_grad():
        logits = ours.layers(x)
        assert torch.equal(logits, theirs.layers(x))
        if norm == "BN":  # eval really uses other statistics than training (on a copy:
            # a training-mode forward moves the running statistics)
            assert not torch.allclose(copy.deepcopy(ours).train().layers(x), logits)
        inst_theirs = inference_instances(BOXES, num_classes=3)
        inst_ours = inference_instances(BOXES, num_classes=3)
        theirs(x, inst_theirs)
        ours(x, inst_ours)
    for a, b in zip(inst_ours, inst_theirs):
        assert torch.equal(a.pred_masks, b.pred_masks)


def test_empty_training_batch_gives_zero_loss_like_detectron2():
    theirs, ours = _pair(False)
    empty = training_instances([[]], num_classes=3)
    x = _features(0)
    with EventStorage():
        loss = ours(x, empty)["loss_mask"]
        assert torch.equal(loss, theirs(x, empty)["loss_mask"])
    assert loss.item() == 0.0


def test_loss_weight_scales_the_loss():
    _, ours = _pair(False)
    instances = training_instances(BOXES, num_classes=3)
    x = _features(5)
    with EventStorage():
        base = ours(x, instances)["loss_mask"]
        ours.loss_weight = 2.5
        assert torch.allclose(ours(x, instances)["loss_mask"], base * 2.5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_interpolation_upsampling_variant(mode):
    cfg = mask_cfg("ConvUpsampleMaskHead", UPSAMPLE_MODE=mode, NORM="GN", conv_dim=32)
    head = build_mask_head(cfg, IN_SHAPE)
    names = [n for n, _ in head.named_children()]
    assert names == ["mask_fcn1", "mask_fcn2", "upsample", "upsample_conv", "predictor"]
    assert head.upsample.mode == mode
    randomize_(head)
    instances = training_instances(BOXES, num_classes=3)
    x = _features(5)
    assert head.layers(x).shape == (5, 3, 14, 14)
    with EventStorage():
        loss = head(x, instances)["loss_mask"]
    loss.backward()
    assert head.upsample_conv.weight.grad.abs().sum() > 0
    # The interpolated map is what the conv sees: check against F.interpolate directly.
    h = head.mask_fcn2(head.mask_fcn1(x))
    expected = torch.nn.functional.interpolate(
        h, scale_factor=2, mode=mode, align_corners=False if mode == "bilinear" else None
    )
    assert torch.allclose(head.upsample(h), expected)


def test_layers_trace_matches_eager():
    _, ours = _pair(False)
    x = _features(3)

    traced = torch.jit.trace(HeadLayers(ours).eval(), (x,))
    x2 = _features(6, seed=3)
    assert torch.equal(traced(x2), ours.layers(x2))
