"""
The fast inference path (``fpn_plugin.inference``) on the plugin's model, through its public
API (``enable_fast_inference``, ``disable_fast_inference``, ``prepare_for_inference``):

- bf16: every convolution (and fc layer) of the backbone, neck, RPN head, box head and mask
  head really runs in bf16, with channels_last on NHWC inputs and weights, while ROIAlign,
  the box predictor and everything after it see fp32 NCHW tensors;
- its boxes, scores and masks stay within bf16's tolerances of fp32 (stated and justified
  below), and differ from fp32 (the path is not a no-op);
- fp32 + channels_last equals fp32 up to float32 rounding;
- ``disable_fast_inference`` restores the fp32 model exactly: bit-identical outputs, weights
  and memory layout.
"""
import pytest
import torch
from detectron2.modeling import build_model
from model_testutils import tiny_mask_rcnn_cfg
from torch import nn

from fpn_plugin.inference import disable_fast_inference, enable_fast_inference, prepare_for_inference

# bf16 keeps 8 significant bits: each rounding of a conv's input, weight or output is off by
# up to 2^-9 (0.2%) relative. Through the ~20 convolutions between the image and the pyramid
# (ResNet-18 + FPN) such errors compound to about 1% of each level's norm, and the heads'
# logits inherit that relative error. Each bound is about 3x what this model measures (in
# brackets, bf16 with and without channels_last) and far below what a real fault gives (a
# skipped layer, fp16 overflow, wrong weights: errors of order 100%).
FEATURE_RTOL = 0.03  # ||fast - fp32|| / ||fp32|| of each pyramid level [0.0077-0.0101]
LOGIT_RTOL = 0.04  # the same for RPN objectness and deltas, box logits and deltas, mask logits [<= 0.013]
# Probabilities: a logit error dz moves p = sigmoid/softmax(z) by at most about dz/4; the
# randomized predictors below give logits up to ~20, so dz reaches ~0.1-0.2.
SCORE_ATOL = 0.06  # class probabilities of every proposal [0.019-0.024]
MASK_PROB_ATOL = 0.15  # mask probabilities, 28x28 per detection [0.050-0.055]
BOX_ATOL = 0.5  # decoded boxes, pixels, on a 96x136 image [0.085-0.089]
# Pasted masks: a pixel flips only where its probability lies within the error of 0.5.
MASK_FLIP_FRACTION = 0.002  # share of all pasted mask pixels that differ [0.00018-0.00021]
# fp32 channels_last changes only the summation order inside some convolutions.
FP32_RTOL = 1e-5  # [<= 2e-6]

PRECISION_CASES = [("bf16", True), ("bf16", False)]


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    cfg = tiny_mask_rcnn_cfg(num_classes=3, components="plugin")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]  # unit-scale input: activations in range
    model = build_model(cfg).eval()
    assert type(model.proposal_generator).__name__ == "PerLevelRPN"  # the plugin's model
    # Predictors with larger random weights than their near-zero init, so scores span (0, 1),
    # masks lie on both sides of 0.5 and boxes move away from the proposals.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, std in (("proposal_generator.rpn_head.objectness_logits", 0.3),
                          ("proposal_generator.rpn_head.anchor_deltas", 0.02),
                          ("roi_heads.box_predictor.cls_score", 0.3),
                          ("roi_heads.box_predictor.bbox_pred", 0.05),
                          ("roi_heads.mask_head.predictor", 0.3)):
            layer = model.get_submodule(name)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * std)
    image = torch.rand(3, 96, 136, generator=g) * 255
    inputs = [{"image": image, "height": 96, "width": 136}]
    return cfg, model, inputs, _outputs(model, inputs)


def run(model, inputs):
    with torch.no_grad():
        return model(inputs)[0]["instances"]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _outputs(model, inputs, proposals=None, detections=None):
    """
    Dense outputs of every stage, on fixed proposals and detections (those of the fp32
    model), so no top-k, NMS or threshold decision can make the two paths pick different
    boxes: pyramid, RPN head outputs, box-head logits/deltas, class probabilities and decoded
    boxes of every proposal, mask logits/probabilities and pasted masks of every detection.
    """
    heads = model.roi_heads
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        rpn = model.proposal_generator
        objectness, deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
        if proposals is None:
            proposals, _ = rpn(images, features)
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features],
                                  [p.proposal_boxes for p in proposals])
        predictions = heads.box_predictor(heads.box_head(pooled))
        scores = heads.box_predictor.predict_probs(predictions, proposals)[0]
        boxes = heads.box_predictor.predict_boxes(predictions, proposals)[0]
        if detections is None:
            detections = model(inputs)[0]["instances"]
        mask_pooled = heads.mask_pooler([features[f] for f in heads.mask_in_features],
                                        [detections.pred_boxes])
        mask_logits = heads.mask_head.layers(mask_pooled)
        with_masks = heads.forward_with_given_boxes(features, [detections[:]])[0]
        pasted = model.inference(inputs, detected_instances=[detections[:]])[0]["instances"]
    return {
        "features": features, "objectness": objectness, "anchor_deltas": deltas,
        "class_logits": predictions[0], "box_deltas": predictions[1], "scores": scores,
        "boxes": boxes, "mask_logits": mask_logits, "mask_probs": with_masks.pred_masks,
        "masks": pasted.pred_masks, "proposals": proposals, "detections": detections,
    }


@pytest.fixture(scope="module")
def fp32_outputs(model_and_inputs):
    """The fp32 model's outputs, taken before any test switched the fast path on."""
    return model_and_inputs[3]


def _fast_outputs(model, inputs, fp32, precision, channels_last):
    enable_fast_inference(model, precision, channels_last=channels_last)
    try:
        return _outputs(model, inputs, fp32["proposals"], fp32["detections"])
    finally:
        disable_fast_inference(model)


def _record_layers(model):
    """
    Forward hooks on every conv/fc layer. Each call appends (module name, input, whether the
    weight was channels_last at that moment, output).
    """
    calls, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            def hook(module, args, output, name=name):
                weight_nhwc = (module.weight.dim() == 4
                               and module.weight.is_contiguous(memory_format=torch.channels_last))
                calls.append((name, args[0], weight_nhwc, output))
            handles.append(module.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("precision,channels_last", PRECISION_CASES)
def test_bf16_convs_really_run_in_bf16_and_channels_last(model_and_inputs, precision,
                                                         channels_last):
    _, model, inputs, _ = model_and_inputs
    pooled_inputs = []
    pre = model.roi_heads.box_pooler.register_forward_pre_hook(
        lambda module, args: pooled_inputs.append(args[0]))
    calls, handles = _record_layers(model)
    enable_fast_inference(model, precision, channels_last=channels_last)
    try:
        out = run(model, inputs)
    finally:
        disable_fast_inference(model)
        for h in handles + [pre]:
            h.remove()
    assert len(out) > 0
    fast_parts = ("backbone.", "proposal_generator.rpn_head.", "roi_heads.box_head.",
                  "roi_heads.mask_head.")
    layers = {name for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))}
    called = {name for name, *_ in calls}
    # Every conv/fc layer of the wrapped parts ran (none bypassed), and ran in bf16.
    expected = {n for n in layers if n.startswith(fast_parts)}
    assert expected and expected <= called
    for name, x, weight_nhwc, output in calls:
        if name.startswith(fast_parts):
            assert output.dtype == torch.bfloat16, name
            if channels_last and output.dim() == 4:
                # NHWC weights and an NHWC result: the convolution ran in channels_last.
                assert weight_nhwc, name
                assert output.is_contiguous(memory_format=torch.channels_last), name
                assert not output.is_contiguous(), name  # really NHWC, not a 1x1 map
        else:  # the box predictor: class scores and box deltas in fp32
            assert name.startswith("roi_heads.box_predictor."), name
            assert x.dtype == output.dtype == torch.float32, name
    # ROIAlign gets fp32 NCHW pyramids; the results are fp32.
    assert pooled_inputs and all(f.dtype == torch.float32 and f.is_contiguous()
                                 for features in pooled_inputs for f in features)
    assert out.scores.dtype == out.pred_boxes.tensor.dtype == torch.float32
    assert out.pred_masks.dtype == torch.bool
    # Back to fp32 afterwards: the same hooks see fp32 everywhere.
    calls.clear()
    calls, handles = _record_layers(model)
    try:
        run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    assert calls and all(output.dtype == torch.float32 for *_, output in calls)


@pytest.mark.parametrize("precision,channels_last", PRECISION_CASES)
def test_bf16_outputs_stay_within_tolerance_of_fp32(model_and_inputs, fp32_outputs, precision,
                                                    channels_last):
    _, model, inputs, _ = model_and_inputs
    ref = fp32_outputs
    fast = _fast_outputs(model, inputs, ref, precision, channels_last)
    for level, x in ref["features"].items():
        err = _rel(fast["features"][level], x)
        assert 1e-4 < err < FEATURE_RTOL, (level, err)  # bf16 moved it, within bounds
    for key in ("objectness", "anchor_deltas"):
        for got, want in zip(fast[key], ref[key]):
            assert _rel(got, want) < LOGIT_RTOL, key
    for key in ("class_logits", "box_deltas", "mask_logits"):
        assert _rel(fast[key], ref[key]) < LOGIT_RTOL, key
    # Final units: probabilities, pixels, mask pixels.
    assert 0 < (fast["scores"] - ref["scores"]).abs().max() < SCORE_ATOL
    assert ref["scores"].max() > 0.9 and ref["scores"].min() < 0.01  # informative range
    assert (fast["boxes"] - ref["boxes"]).abs().max() < BOX_ATOL
    assert (fast["mask_probs"] - ref["mask_probs"]).abs().max() < MASK_PROB_ATOL
    assert ref["mask_probs"].max() > 0.9 and ref["mask_probs"].min() < 0.1
    masks, ref_masks = fast["masks"], ref["masks"]
    assert masks.shape == ref_masks.shape and ref_masks.any()
    assert (masks != ref_masks).float().mean() < MASK_FLIP_FRACTION


def test_fp32_channels_last_matches_fp32(model_and_inputs, fp32_outputs):
    _, model, inputs, _ = model_and_inputs
    ref = fp32_outputs
    fast = _fast_outputs(model, inputs, ref, "fp32", True)
    for level, x in ref["features"].items():
        assert _rel(fast["features"][level], x) < FP32_RTOL, level
    for key in ("objectness", "anchor_deltas"):
        for got, want in zip(fast[key], ref[key]):
            assert _rel(got, want) < FP32_RTOL, key
    for key in ("class_logits", "box_deltas", "mask_logits", "boxes"):
        assert _rel(fast[key], ref[key]) < FP32_RTOL, key
    assert torch.equal(fast["masks"], ref["masks"])


@pytest.mark.parametrize("precision,channels_last", PRECISION_CASES + [("fp32", True)])
def test_disable_restores_exact_outputs(model_and_inputs, fp32_outputs, precision,
                                       channels_last):
    _, model, inputs, _ = model_and_inputs
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = fp32_outputs["detections"]  # before the fast path was ever enabled
    enable_fast_inference(model, precision, channels_last=channels_last)
    fast = run(model, inputs)
    disable_fast_inference(model)
    out = run(model, inputs)
    assert len(out) == len(ref) > 0
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        got, want = out.get(field), ref.get(field)
        got, want = getattr(got, "tensor", got), getattr(want, "tensor", want)
        assert torch.equal(got, want), field
    if precision == "bf16":
        assert not torch.equal(fast.scores, ref.scores)  # the fast path did change them
    # Weights bit-identical and back in NCHW; no wrapper left on any module.
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
        assert value.is_contiguous(), name
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__ and "layers" not in module.__dict__, name
    assert not hasattr(model, "_fpn_plugin_fast_inference")


def test_prepare_for_inference_reads_config(model_and_inputs):
    cfg, model, inputs, _ = model_and_inputs
    cfg = cfg.clone()
    cfg.MODEL.FAST_INFERENCE.PRECISION = "bf16"
    model.train()
    prepare_for_inference(model, cfg)
    try:
        assert not model.training
        assert model._fpn_plugin_fast_inference == ("bf16", False)
        assert len(run(model, inputs)) > 0
    finally:
        disable_fast_inference(model)


@pytest.mark.parametrize("precision,match", [("int8", "unknown value 'int8'"),
                                             ("fp16", "needs a CUDA device")])
def test_bad_precision_names_the_key(model_and_inputs, precision, match):
    _, model, _, _ = model_and_inputs
    with pytest.raises(ValueError, match="MODEL.FAST_INFERENCE.PRECISION") as info:
        enable_fast_inference(model, precision)
    assert match in str(info.value)
