"""The plugin's model on CUDA: parity with Detectron2, CPU agreement, AMP training (Detectron2's
autocast, and the fast training path in fp16 and bf16), fp16 inference path.

Skipped without a CUDA device (CI has none); tools/gpu_check.sh runs them on a GPU machine.
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detection_testutils import assert_same_detections
from model_testutils import tiny_mask_rcnn_cfg

from fpn_plugin.inference import disable_fast_inference, enable_fast_inference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(components, device, sample_everything=False):
    torch.manual_seed(0)
    cfg = tiny_mask_rcnn_cfg(num_classes=3, components=components)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    if sample_everything:
        # Training parity across devices: CPU and CUDA draw different random samples, so
        # nothing random or cut at a near-tie may pick what is trained on. Every anchor and
        # proposal is sampled (the losses are means, so their order does not matter), and
        # neither NMS nor top-k cuts (see tests/engine/distributed_jobs.py for the same idea).
        cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 1 << 20
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 1 << 20
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1 << 20
        cfg.MODEL.RPN.NMS_THRESH = 1.0
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 1 << 20
    model = build_model(cfg)
    # Zeroed delta predictors: proposals are anchors and detections stay inside the image.
    for layer in (model.proposal_generator.rpn_head.anchor_deltas,
                  model.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def _batch(size=128):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 255
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 60.0], [40.0, 50.0, 120.0, 110.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 12:60, 10:70] = True
    masks[1, 50:110, 40:120] = True
    inst.gt_masks = BitMasks(masks)
    return [{"image": image, "height": size, "width": size, "instances": inst}]


def _infer(model, batch):
    with torch.no_grad():
        inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch]
        return model.eval()(inputs)[0]["instances"].to("cpu")


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    """Deterministic kernels, and true fp32: TF32 (on by default for cuDNN convolutions) keeps
    10 mantissa bits, so "fp32" results would differ from the CPU's by ~1e-3 relative."""
    flags = (torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "benchmark", False), \
        (torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)
    old = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    yield
    for (obj, name, _), value in zip(flags, old):
        setattr(obj, name, value)


# Tolerances of "the same detections" (tests/detection_testutils.py pairs them by class and
# box IoU first). Boxes: the box and anchor delta predictors are zeroed (_model), so every box
# is an anchor clipped to the image on both sides; 1e-3 px covers the float32 decode. Scores:
# in fp32 the two devices run other kernels (cuDNN against oneDNN, other summation orders),
# ~1e-6 relative per layer in this 10-layer model; 1e-4 keeps a 10x margin while a wrong op
# (another normalization, a missing level) moves scores by 1e-2 and more. Masks: a pixel
# flips where its probability sits within rounding of 0.5; 0.98 IoU allows a few such pixels
# per mask, a mask from another detection overlaps far less. fp16 keeps 11 mantissa bits
# (~5e-4 relative per op), accumulated over the network: 2e-2 on scores, 0.9 on mask IoU.
LR = 3e-4
FP32_TOL = dict(box_atol=1e-3, score_atol=1e-4, min_mask_iou=0.98)
FP16_TOL = dict(box_atol=1e-2, score_atol=2e-2, min_mask_iou=0.9)


def test_plugin_matches_detectron2_on_cuda():
    ref = _model("detectron2", "cuda")
    plugin = _model("plugin", "cuda")
    assert type(plugin.proposal_generator).__name__ == "PerLevelRPN"
    incompatible = plugin.load_state_dict(ref.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    batch = _batch()
    got, want = _infer(plugin, batch), _infer(ref, batch)
    # The same ops on the same device: the same detections, in the same order.
    assert len(want) > 0 and len(got) == len(want)
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.pred_classes, want.pred_classes)
    assert torch.equal(got.pred_masks, want.pred_masks)


def test_cuda_agrees_with_cpu():
    """Every detection (not the top 10): paired by class and box, then box, score and mask."""
    cpu = _model("plugin", "cpu")
    cuda = _model("plugin", "cuda")
    cuda.load_state_dict(cpu.state_dict())
    batch = _batch()
    pairing = assert_same_detections(_infer(cuda, batch), _infer(cpu, batch), **FP32_TOL)
    assert len(pairing.pairs) > 10


def _train(model, batch, steps, autocast_dtype=None):
    """``steps`` SGD steps on one batch; the losses of each step and the final weights. The
    learning rate is small: with every proposal sampled this random tiny model starts with a
    classification loss near 15 (its class logits are large), and 0.01 diverges in two steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if autocast_dtype else None
    from detectron2.utils.events import EventStorage

    history, scales = [], [scaler.get_scale()] if scaler else []
    model.train()
    for step in range(steps):
        with EventStorage(step), torch.autocast("cuda", dtype=autocast_dtype or torch.float16,
                                                enabled=autocast_dtype is not None):
            losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), (step, history, {k: v.item() for k, v in losses.items()})
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        if scaler is None:
            total.backward()
            optimizer.step()
        else:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
    # A skipped step (overflow) lowers the scale; the comparison needs every step taken.
    assert scales == sorted(scales), f"the gradient scaler skipped a step: {scales}"
    return history, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _relative_update_difference(initial, a, b):
    diff = upd = 0.0
    for k, v in initial.items():
        if v.is_floating_point():
            diff += (a[k].double() - b[k].double()).pow(2).sum().item()
            upd += (a[k].double() - v.double()).pow(2).sum().item()
    assert upd > 0, "training did not move the weights"
    return (diff / upd) ** 0.5


def test_cuda_training_matches_cpu_training():
    """Three SGD steps from the same weights on the same batch, on CPU and on CUDA (fp32):
    the same losses at every step and the same weights after. Tolerances, from a CPU
    measurement of how these steps amplify a difference: weights perturbed by 1e-6 relative
    (well above float32's 6e-8 rounding, which is all other kernels change) moved the losses
    by <= 1.6e-4 relative and the update by 1.5e-4 of its norm; the bounds below are ~6x that.
    A real difference (a loss normalized otherwise, a gradient lost on one device) moves
    them by tens of percent."""
    cpu = _model("plugin", "cpu", sample_everything=True)
    cuda = _model("plugin", "cuda", sample_everything=True)
    cuda.load_state_dict(cpu.state_dict())
    initial = {k: v.detach().clone() for k, v in cpu.state_dict().items()}
    batch = _batch()
    cuda_batch = [{**x, "instances": x["instances"].to("cuda")} for x in batch]
    hist_cpu, final_cpu = _train(cpu, batch, 3)
    hist_cuda, final_cuda = _train(cuda, cuda_batch, 3)
    for step, (a, b) in enumerate(zip(hist_cuda, hist_cpu)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), (step, k)
    assert _relative_update_difference(initial, final_cuda, final_cpu) < 1e-3


def test_amp_training_follows_fp32_training():
    """Detectron2's AMP (autocast fp16 + gradient scaler) against fp32 on CUDA from the same
    weights on the same batch. One step: losses within 1e-2 relative and the weight update
    within 10% of its norm (on CPU, weights perturbed by 5e-4 relative, fp16's rounding, moved
    the losses by 1.2e-3 and this update by 0.9%; a scaler left unscaled changes the update
    by orders of magnitude, a loss overflowing in fp16 makes it non-finite). Then five AMP
    steps: finite losses that drop, no step skipped by the scaler."""
    fp32 = _model("plugin", "cuda", sample_everything=True)
    amp = _model("plugin", "cuda", sample_everything=True)
    amp.load_state_dict(fp32.state_dict())
    initial = {k: v.detach().float().cpu() for k, v in fp32.state_dict().items()}
    batch = [{**x, "instances": x["instances"].to("cuda")} for x in _batch()]
    hist32, final32 = _train(fp32, batch, 1)
    hist16, final16 = _train(amp, batch, 1, autocast_dtype=torch.float16)
    for k in hist32[0]:
        assert hist16[0][k] == pytest.approx(hist32[0][k], rel=1e-2, abs=1e-4), k
    assert _relative_update_difference(initial, final16, final32) < 0.1
    longer = _model("plugin", "cuda", sample_everything=True)
    history, _ = _train(longer, batch, 5, autocast_dtype=torch.float16)
    assert min(sum(h.values()) for h in history[1:]) < sum(history[0].values()), history


def test_fp16_fast_path_returns_fp32_results_close_to_fp32():
    """The fp16 inference path against fp32: every detection paired by class and box, then
    compared (scores no longer sorted apart from their boxes)."""
    model = _model("plugin", "cuda")
    batch = _batch()
    ref = _infer(model, batch)
    enable_fast_inference(model, "fp16", channels_last=True)
    try:
        out = _infer(model, batch)
    finally:
        disable_fast_inference(model)
    assert out.scores.dtype == torch.float32 and len(out) > 0
    assert out.pred_boxes.tensor.dtype == torch.float32
    assert_same_detections(out, ref, **FP16_TOL)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fast_training_path_on_cuda_trains_convs_in_low_precision(precision):
    """SOLVER.AMP on CUDA: the components' convs in fp16 (with the gradient scaler) or bf16
    (without), NHWC; losses fp32, finite and decreasing over a few steps on one batch."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from fpn_plugin.engine.precision import GradScalerTrainer, enable_fast_training, make_train_loop

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bf16")
    model = enable_fast_training(_model("plugin", "cuda"), precision, channels_last=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    outputs = []
    handles = [m.register_forward_hook(lambda mod, i, o: outputs.append(o.dtype))
               for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    batch = _batch()
    batch = [{**x, "image": x["image"].cuda(), "instances": x["instances"].to("cuda")} for x in batch]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loop = make_train_loop(model, [batch] * 8, optimizer, precision)
    assert type(loop) is (GradScalerTrainer if precision == "fp16" else SimpleTrainer)
    totals = []
    with EventStorage() as storage:
        loop.storage = storage
        for i in range(8):
            storage.iter = i
            loop.run_step()
            totals.append(storage.latest()["total_loss"][0])
    for h in handles:
        h.remove()
    assert set(outputs) == {dtype}
    assert all(torch.isfinite(torch.tensor(totals))), totals
    assert min(totals[-3:]) < totals[0], totals
    assert all(p.dtype == torch.float32 for p in model.parameters())
