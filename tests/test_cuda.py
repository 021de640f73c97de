"""The plugin's model on CUDA: parity with Detectron2, CPU agreement, AMP training (Detectron2's
autocast, and the fast training path in fp16 and bf16), fp16 inference path.

Skipped without a CUDA device (CI has none); tools/gpu_check.sh runs them on a GPU machine.
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from model_testutils import tiny_mask_rcnn_cfg

from fpn_plugin.inference import disable_fast_inference, enable_fast_inference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(components, device):
    torch.manual_seed(0)
    cfg = tiny_mask_rcnn_cfg(num_classes=3, components=components)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
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
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def test_plugin_matches_detectron2_on_cuda():
    ref = _model("detectron2", "cuda")
    plugin = _model("plugin", "cuda")
    assert type(plugin.proposal_generator).__name__ == "PerLevelRPN"
    incompatible = plugin.load_state_dict(ref.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    batch = _batch()
    got, want = _infer(plugin, batch), _infer(ref, batch)
    assert len(want) > 0 and len(got) == len(want)
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.pred_classes, want.pred_classes)


def test_cuda_agrees_with_cpu():
    cpu = _model("plugin", "cpu")
    cuda = _model("plugin", "cuda")
    cuda.load_state_dict(cpu.state_dict())
    batch = _batch()
    a, b = _infer(cuda, batch), _infer(cpu, batch)
    assert len(a) > 0
    n = min(len(a), len(b), 10)  # the best detections; ties far down the list may reorder
    torch.testing.assert_close(a.scores[:n], b.scores[:n], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.pred_boxes.tensor[:n], b.pred_boxes.tensor[:n], atol=1e-2,
                               rtol=1e-3)


def test_amp_training_steps_give_finite_decreasing_loss():
    model = _model("plugin", "cuda").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    batch = _batch()
    totals = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.float16):
            losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        totals.append(total.item())
    assert min(totals[-3:]) < totals[0], totals


def test_fp16_fast_path_returns_fp32_results_close_to_fp32():
    model = _model("plugin", "cuda")
    batch = _batch()
    ref = _infer(model, batch)
    enable_fast_inference(model, "fp16", channels_last=True)
    try:
        out = _infer(model, batch)
    finally:
        disable_fast_inference(model)
    assert out.scores.dtype == torch.float32 and len(out) > 0
    n = min(len(out), len(ref))
    assert (out.scores[:n].sort().values - ref.scores[:n].sort().values).abs().max() < 0.05


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
