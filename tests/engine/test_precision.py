"""
The fast training path (fpn_plugin.engine.precision) on the demo's model at 64 px: the convs
of every component really run in bf16 (forward and backward) and in NHWC, what lies between
components (anchors, ROIAlign, the box predictor, every loss) stays fp32, losses stay close
to fp32, evaluation of the same model stays fp32, and the loops (bf16: no scaler; fp16: a
gradient scaler, exercised here with a CPU scaler) step like Detectron2's.
"""
import pytest
import torch
from demo_testutils import DEMO_CONFIG, TINY_OPTS
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import mask_head as d2_mask_head
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from fpn_plugin.config import load_config
from fpn_plugin.data.shapes import shapes_training_input
from fpn_plugin.engine.precision import (
    GradScalerTrainer,
    build_train_loop,
    check_training_precision,
    disable_fast_training,
    enable_fast_training,
    make_train_loop,
)
import fpn_plugin.utils.precision as fpn_precision
from fpn_plugin.utils.precision import conv_components


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO_CONFIG, TINY_OPTS)


@pytest.fixture(scope="module")
def batch():
    return [shapes_training_input(64, seed) for seed in (0, 1)]


def model_pair(cfg, precision="bf16", channels_last=True):
    """The tiny demo model twice with equal weights: plain (fp32) and set up for training."""
    torch.manual_seed(0)
    ref = build_model(cfg).train()
    fast = build_model(cfg).train()
    fast.load_state_dict(ref.state_dict())
    return ref, enable_fast_training(fast, precision, channels_last)


def losses(model, batch, seed=0):
    torch.manual_seed(seed)  # the same RPN / ROI sampling in both models
    with EventStorage():
        return model(batch)


def component_convs(model):
    return [m for component, _ in conv_components(model) for m in component.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]


def test_bf16_step_runs_component_convs_in_bf16_and_the_rest_in_fp32(cfg, batch, monkeypatch):
    _, model = model_pair(cfg)
    convs = component_convs(model)
    assert len(convs) > 20  # backbone, neck, RPN head, mask head (box head is fc-only here)
    seen, grads, between = {}, {}, {}

    def record(name):
        def fwd(module, inputs, output):
            seen[name] = (inputs[0].dtype, output.dtype,
                          inputs[0].is_contiguous(memory_format=torch.channels_last))
            output.register_hook(lambda grad: grads.__setitem__(name, grad.dtype))
        return fwd

    handles = [conv.register_forward_hook(record(i)) for i, conv in enumerate(convs)]

    def pre(name):
        def hook(module, inputs):
            tensors = [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])
                       if isinstance(t, torch.Tensor) and t.is_floating_point()]
            between[name] = {t.dtype for t in tensors}
        return hook

    heads = model.roi_heads
    handles += [heads.box_pooler.register_forward_pre_hook(pre("ROIAlign (box)")),
                heads.box_predictor.register_forward_pre_hook(pre("box predictor"))]
    if heads.mask_pooler is not None:
        handles.append(heads.mask_pooler.register_forward_pre_hook(pre("ROIAlign (mask)")))
    handles.append(model.proposal_generator.anchor_generator.register_forward_hook(
        lambda m, i, out: between.__setitem__("anchors", {a.tensor.dtype for a in out})))
    # What the losses are computed from.
    rpn_losses = model.proposal_generator.losses
    box_losses = heads.box_predictor.losses
    mask_loss = d2_mask_head.mask_rcnn_loss

    def spy_rpn(anchors, logits, labels, deltas, gt_boxes):
        between["RPN loss inputs"] = {t.dtype for t in logits + deltas}
        return rpn_losses(anchors, logits, labels, deltas, gt_boxes)

    def spy_box(predictions, proposals):
        between["box loss inputs"] = {t.dtype for t in predictions}
        return box_losses(predictions, proposals)

    def spy_mask(logits, instances, *args, **kwargs):
        between["mask loss input"] = {logits.dtype}
        return mask_loss(logits, instances, *args, **kwargs)

    monkeypatch.setattr(model.proposal_generator, "losses", spy_rpn)
    monkeypatch.setattr(heads.box_predictor, "losses", spy_box)
    monkeypatch.setattr(d2_mask_head, "mask_rcnn_loss", spy_mask)
    try:
        out = losses(model, batch)
        total = sum(out.values())
        total.backward()
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(convs) and len(grads) == len(convs)
    # Forward: every conv computes in bf16 (the first one casts the fp32 image), on NHWC input.
    assert {o for _, o, _ in seen.values()} == {torch.bfloat16}
    assert {i for i, _, _ in seen.values()} <= {torch.bfloat16, torch.float32}
    assert all(nhwc for _, _, nhwc in seen.values())
    # Backward: the gradients flowing into the convs are bf16 too.
    assert set(grads.values()) == {torch.bfloat16}
    # Between components and in the losses: fp32 only.
    expected = {"anchors", "ROIAlign (box)", "box predictor", "RPN loss inputs", "box loss inputs",
                "mask loss input"} | ({"ROIAlign (mask)"} if heads.mask_pooler is not None else set())
    assert set(between) == expected
    assert all(dtypes == {torch.float32} for dtypes in between.values()), between
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    # Parameters and their gradients stay fp32 (what the optimizer and checkpoints see).
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               and torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert sum(p.grad is not None for p in params) > 0.9 * len(params)


def test_bf16_losses_are_close_to_fp32(cfg, batch):
    """
    Same weights, same batch, same sampling seed. bf16 keeps 8 significant bits (relative
    rounding 2^-9) and conv sums accumulate in fp32. Through 20 conv + BN layers in training
    mode the features' error grows to 3-5% of their magnitude here (measured): BN's batch
    statistics over few values per channel (res5 is 2x2 at 64 px: 8 values per channel in a
    batch of 2) amplify it; 10% is the bound. The losses, means over many terms, move far
    less (measured: at most 0.1%); 2% is their bound. The ROI losses are compared on equal
    inputs (the fp32 features and proposals): a bf16 RPN may rank a near-tie of proposals
    differently, and ROI sampling (discrete) then picks other boxes.
    """
    ref, fast = model_pair(cfg)
    a, b = losses(ref, batch), losses(fast, batch)
    for key in ("loss_rpn_cls", "loss_rpn_loc"):
        torch.testing.assert_close(b[key], a[key], rtol=0.02, atol=1e-4)

    images = ref.preprocess_image(batch)
    targets = [x["instances"] for x in batch]
    with torch.no_grad(), EventStorage():
        features = ref.backbone(images.tensor)
        fast_features = fast.backbone(images.tensor)
        for name in features:
            scale = features[name].abs().mean()
            assert fast_features[name].dtype == torch.float32
            assert (fast_features[name] - features[name]).abs().mean() < 0.1 * scale, name
        torch.manual_seed(0)
        proposals, _ = ref.proposal_generator(images, features, targets)
        proposals = [Instances(p.image_size, **p.get_fields()) for p in proposals]
        torch.manual_seed(1)
        _, roi_a = ref.roi_heads(images, features, [Instances(p.image_size, **p.get_fields())
                                                     for p in proposals], targets)
        torch.manual_seed(1)
        _, roi_b = fast.roi_heads(images, features, proposals, targets)
    assert set(roi_a) == {"loss_cls", "loss_box_reg", "loss_mask"}
    for key in roi_a:
        assert torch.isfinite(roi_b[key])
        torch.testing.assert_close(roi_b[key], roi_a[key], rtol=0.02, atol=1e-4)


def test_channels_last_alone_is_fp32_in_nhwc(cfg, batch):
    ref, fast = model_pair(cfg, "fp32", channels_last=True)
    convs = component_convs(fast)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
               if c.weight.dim() == 4 and c.weight.shape[-1] > 1)
    inputs = []
    handles = [c.register_forward_hook(lambda m, i, o: inputs.append((i[0], o))) for c in convs]
    try:
        a, b = losses(ref, batch), losses(fast, batch)
    finally:
        for h in handles:
            h.remove()
    assert all(i.dtype == o.dtype == torch.float32 for i, o in inputs)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for _, o in inputs
               if o.shape[1] > 1 and o.shape[-1] * o.shape[-2] > 1)
    # Only the summation order changes: fp32 rounding.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert fast._fpn_plugin_fast_training == ("fp32", True)


def test_eval_mode_of_a_model_set_up_for_training_is_plain_fp32(cfg, batch):
    ref, fast = model_pair(cfg, "bf16", channels_last=False)
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch]
    with torch.no_grad():
        want = ref.eval()(inputs)
        got = fast.eval()(inputs)
    for g, w in zip(got, want):
        assert torch.equal(g["instances"].pred_boxes.tensor, w["instances"].pred_boxes.tensor)
        assert torch.equal(g["instances"].pred_masks, w["instances"].pred_masks)


def test_disable_restores_the_plain_model(cfg, batch):
    ref, fast = model_pair(cfg)
    disable_fast_training(fast)
    assert not hasattr(fast, "_fpn_plugin_fast_training")
    assert "forward" not in fast.backbone.__dict__
    assert all(c.weight.is_contiguous() for c in component_convs(fast))
    a, b = losses(ref, batch), losses(fast, batch)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision,channels_last,match", [
    ("fp16", False, "SOLVER.AMP.PRECISION 'fp16' needs a CUDA device"),
    ("int8", False, "SOLVER.AMP.PRECISION must be one of .*'int8'"),
    ("bf16", "yes", "SOLVER.CHANNELS_LAST must be True or False, got 'yes'"),
])
def test_bad_settings_name_the_key(cfg, precision, channels_last, match):
    model = build_model(cfg)
    with pytest.raises(ValueError, match=match):
        enable_fast_training(model, precision, channels_last)
    assert "forward" not in model.backbone.__dict__


def test_errors_name_the_callers_keys(monkeypatch):
    """The LazyConfig entry validates with its own key names."""
    # "auto" depends on the CPU (tests/inference/test_auto_path.py): fake one with native bf16.
    monkeypatch.setattr(fpn_precision, "cpu_has_native_bf16", lambda flags=None: True)
    keys = ("train.amp.precision", "train.channels_last")
    with pytest.raises(ValueError, match="train.amp.precision 'fp16' needs a CUDA device"):
        check_training_precision("fp16", "cpu", False, keys=keys)
    with pytest.raises(ValueError, match="train.channels_last must be True or False"):
        check_training_precision("bf16", "cpu", 1, keys=keys)
    assert check_training_precision("auto", "cpu", True, keys=keys) == "bf16"


def test_ddp_wrapped_model_is_refused():
    from torch.nn.parallel import DistributedDataParallel

    fake = DistributedDataParallel.__new__(DistributedDataParallel)
    with pytest.raises(ValueError, match="before create_ddp_model"):
        enable_fast_training(fake, "bf16")


def _scaler_steps(cfg, batch, loop_factory, steps=2):
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loop = loop_factory(model, [batch] * steps, optimizer)
    with EventStorage() as storage:
        loop.storage = storage
        for _ in range(steps):
            torch.manual_seed(0)
            loop.run_step()
    return loop, model


def test_grad_scaler_loop_steps_like_the_plain_loop(cfg, batch):
    """fp16's loop on CPU with a CPU scaler: a power-of-two scale is exact in fp32, so after
    unscaling, the step equals Detectron2's plain one."""
    _, plain = _scaler_steps(cfg, batch, SimpleTrainer)
    loop, scaled = _scaler_steps(cfg, batch, lambda m, d, o: GradScalerTrainer(
        m, d, o, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)))
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    state = loop.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0 ** 10 and "optimizer" in state


def test_grad_scaler_loop_skips_a_step_with_overflowing_gradients(cfg, batch):
    """One parameter's gradient overflows (made inf by a hook): no parameter moves, the scale
    shrinks, and the scaler's state round-trips through the loop's state_dict."""
    def overflowing(model, data, optimizer):
        next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
        return GradScalerTrainer(model, data, optimizer,
                                 grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))

    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    loop, model = _scaler_steps(cfg, batch, overflowing, steps=1)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert loop.grad_scaler.get_scale() == 2.0 ** 9
    restored = GradScalerTrainer(model, [batch], loop.optimizer,
                                 grad_scaler=torch.amp.GradScaler("cpu"))
    restored.load_state_dict(loop.state_dict())
    assert restored.grad_scaler.get_scale() == 2.0 ** 9


def test_loops_by_precision(cfg, batch):
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    assert type(make_train_loop(model, [batch], optimizer, "bf16")) is SimpleTrainer
    assert type(make_train_loop(model, [batch], optimizer, "auto")) is SimpleTrainer  # CPU
    assert isinstance(make_train_loop(model, [batch], optimizer, "fp16",
                                      grad_scaler=torch.amp.GradScaler("cpu")), GradScalerTrainer)
    with pytest.raises(ValueError, match="only used with precision 'fp16'"):
        make_train_loop(model, [batch], optimizer, "bf16", grad_scaler=torch.amp.GradScaler("cpu"))


def test_build_train_loop_is_the_whole_set_up_for_other_entries(cfg, batch):
    """What the LazyConfig entry calls: model set-up, DDP (none with one process), loop."""
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loop = build_train_loop(model, [batch] * 2, optimizer, precision="auto", channels_last=True)
    assert type(loop) is SimpleTrainer and loop.model is model
    assert model._fpn_plugin_fast_training == ("bf16", True)
    with EventStorage() as storage:
        loop.storage = storage
        loop.run_step()
        assert torch.isfinite(torch.tensor(storage.latest()["total_loss"][0]))
