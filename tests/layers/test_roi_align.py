"""
SparseROIAlign against torchvision's kernel (what Detectron2's ROIAlign calls): outputs and
input gradients to float rounding, over the geometry torchvision handles specially (aligned or
not, adaptive or fixed grids, ROIs partly or wholly outside the map, empty and tiny ROIs,
images of a batch), and the swap into a model's ROI poolers.
"""
import copy
import os

import pytest
import torch
from detectron2.layers import ROIAlign
from torchvision.ops import roi_align

from fpn_plugin.layers.roi_align import (SparseROIAlign, restore_roi_align, roi_align_weights,
                                         sparse_roi_align, use_sparse_roi_align)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# fp32 sums of up to 4 * grid^2 products in another order: rounding, not method, differences.
ATOL = 1e-5


def _rois(gen, num, images, extent, min_size=1.0, max_size=60.0):
    xy = torch.rand(num, 2, generator=gen) * extent - 10  # some start outside the map
    wh = torch.rand(num, 2, generator=gen) * (max_size - min_size) + min_size
    index = torch.randint(0, images, (num, 1), generator=gen).float()
    return torch.cat([index, xy, xy + wh], dim=1)


def _both(features, rois, output_size, scale, ratio, aligned):
    ref_in = features.detach().clone().requires_grad_()
    new_in = features.detach().clone().requires_grad_()
    ref = roi_align(ref_in, rois, output_size, scale, ratio, aligned)
    new = sparse_roi_align(new_in, rois, output_size, scale, ratio, aligned)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    new.backward(grad)
    return ref, new, ref_in.grad, new_in.grad


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (5, 3)])
def test_outputs_and_gradients_match_torchvision(aligned, ratio, output_size):
    gen = torch.Generator().manual_seed(ratio * 10 + output_size[1] + aligned)
    features = torch.randn(3, 6, 19, 23, generator=gen)
    rois = _rois(gen, 40, images=3, extent=100)
    ref, new, ref_grad, new_grad = _both(features, rois, output_size, 0.25, ratio, aligned)
    assert new.shape == ref.shape and new.dtype == ref.dtype
    torch.testing.assert_close(new, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(new_grad, ref_grad, atol=ATOL, rtol=0)
    assert ref.abs().sum() > 0 and ref_grad.abs().sum() > 0  # the case samples something


def test_edge_geometry_matches_torchvision():
    """ROIs wholly outside, on the last row/column, zero-size and inverted (aligned: no
    samples; not aligned: at least 1x1), one pixel wide, and the whole map."""
    features = torch.randn(2, 4, 8, 10)
    rois = torch.tensor([
        [0, -50, -50, -20, -20],   # outside: zeros
        [1, 36, 28, 40, 32],       # over the last row and column (scale 1/4: x 9-10, y 7-8)
        [0, 12, 12, 12, 12],       # zero size
        [1, 20, 20, 10, 10],       # inverted
        [0, 4, 4, 5, 30],          # a sliver
        [1, 0, 0, 40, 32],         # the whole map
        [0, -3, -3, 2, 2],         # across the top-left corner
    ], dtype=torch.float32)
    for aligned in (True, False):
        for ratio in (0, 2):
            ref, new, ref_grad, new_grad = _both(features, rois, (7, 7), 0.25, ratio, aligned)
            torch.testing.assert_close(new, ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(new_grad, ref_grad, atol=ATOL, rtol=0)


def test_no_rois_and_channels_last_and_bf16():
    features = torch.randn(2, 8, 12, 12)
    empty = sparse_roi_align(features, torch.zeros(0, 5), (7, 7), 0.5, 0, True)
    assert empty.shape == (0, 8, 7, 7)
    rois = _rois(torch.Generator().manual_seed(0), 10, images=2, extent=20, max_size=15)
    nhwc = features.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sparse_roi_align(nhwc, rois, (7, 7), 0.5, 0, True),
                               roi_align(features, rois, (7, 7), 0.5, 0, True), atol=ATOL, rtol=0)
    # bf16 features: pooled in fp32 and handed back in bf16 (torchvision under autocast alike)
    low = features.bfloat16()
    out = sparse_roi_align(low, rois, (7, 7), 0.5, 0, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), roi_align(low.float(), rois, (7, 7), 0.5, 0, True),
                               atol=1e-2, rtol=1e-2)


def test_repeats_bit_for_bit():
    """Outputs and input gradients are the same on every call (the demo's seeded runs repeat
    to the last digit only if every training op does), with the threads torch has."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, 40, 40).to(memory_format=torch.channels_last)
    corners = torch.rand(128, 2) * 120
    rois = torch.cat([torch.randint(0, 8, (128, 1)).float(), corners,
                      corners + torch.rand(128, 2) * 60 + 4], 1)
    grad = torch.randn(128, 32, 14, 14)
    results = []
    for _ in range(3):
        leaf = x.detach().clone().requires_grad_(True)
        out = sparse_roi_align(leaf, rois, (14, 14), 0.25, 0, True)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    for out, grad_in in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad_in, results[0][1])


def test_weights_rows_are_sorted_and_sum_to_the_in_map_share():
    """Each output bin's weights sum to the share of its samples inside the map (1 for a ROI
    well inside): the matrix is an average of bilinear interpolations."""
    rois = torch.tensor([[0, 8.0, 8.0, 40.0, 40.0], [0, -40.0, -40.0, 0.0, 0.0]])
    rows, cols, values = roi_align_weights(rois, 16, 16, (7, 7), 0.25, 0, True)
    assert torch.all(rows[1:] >= rows[:-1])
    sums = torch.zeros(2 * 49).index_add_(0, rows, values)
    torch.testing.assert_close(sums[:49], torch.ones(49))
    assert sums[49:].max() < 1  # mostly outside
    assert cols.min() >= 0 and cols.max() < 16 * 16


def test_no_gradient_flows_to_the_rois():
    features = torch.randn(1, 3, 10, 10, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0]], requires_grad=True)
    sparse_roi_align(features, rois, (4, 4), 0.5, 2, True).sum().backward()
    assert rois.grad is None and features.grad is not None


def test_module_uses_torchvision_when_no_gradient_is_needed(monkeypatch):
    module = SparseROIAlign.like(ROIAlign((7, 7), 0.25, 0, aligned=True))
    features = torch.randn(1, 4, 16, 16)
    rois = torch.tensor([[0, 4.0, 4.0, 40.0, 50.0]])
    calls = []
    import fpn_plugin.layers.roi_align as mod

    original = mod.sparse_roi_align
    monkeypatch.setattr(mod, "sparse_roi_align", lambda *a: calls.append(1) or original(*a))
    expected = ROIAlign((7, 7), 0.25, 0, aligned=True)(features, rois)
    assert torch.equal(module(features, rois), expected) and not calls  # bit-identical
    with torch.no_grad():
        module(features.requires_grad_(), rois)
    assert not calls
    module(features, rois).sum().backward()
    assert calls == [1]
    assert "sampling_ratio=0" in repr(module)


def test_scripted_and_traced_it_is_torchvisions_kernel():
    module = SparseROIAlign((7, 7), 0.25, 0, aligned=True)
    features = torch.randn(2, 4, 16, 16, requires_grad=True)
    rois = torch.tensor([[0, 4.0, 4.0, 40.0, 50.0], [1, 0.0, 8.0, 30.0, 20.0]])
    expected = roi_align(features, rois, (7, 7), 0.25, 0, True)
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(features, rois), expected)
    traced = torch.jit.trace(module, (features, rois), check_trace=False)
    assert torch.equal(traced(features, rois), expected)


def test_swap_into_a_models_poolers_and_back():
    from detectron2.modeling import build_model

    from fpn_plugin.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "Base-RCNN-CustomFPN.yaml"), [
                         "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "True",
                         "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
                         "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    reference = copy.deepcopy(model)
    assert use_sparse_roi_align(model) == 8  # 4 levels x (box, mask)
    assert use_sparse_roi_align(model) == 0  # already swapped
    assert sum(isinstance(m, SparseROIAlign) for m in model.modules()) == 8
    assert model.state_dict().keys() == reference.state_dict().keys()
    from detectron2.utils.events import EventStorage

    from fpn_plugin.data.shapes import shapes_training_input

    batch = [shapes_training_input(128, seed=s) for s in range(2)]
    with EventStorage(0):
        torch.manual_seed(1)
        ref_losses = reference(batch)
        torch.manual_seed(1)
        losses = model(batch)
    for name in ref_losses:  # same sampled ROIs, same pooled features to rounding
        torch.testing.assert_close(losses[name], ref_losses[name], atol=1e-5, rtol=1e-5)
    sum(losses.values()).backward()
    sum(ref_losses.values()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    assert restore_roi_align(model) == 8
    assert not any(isinstance(m, SparseROIAlign) for m in model.modules())
