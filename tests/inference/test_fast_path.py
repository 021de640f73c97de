"""The fast inference path on the plugin's model: fp32 outputs, close to fp32, reversible."""
import pytest
import torch
from detectron2.modeling import build_model
from model_testutils import tiny_mask_rcnn_cfg

from fpn_plugin.inference import disable_fast_inference, enable_fast_inference, prepare_for_inference


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    cfg = tiny_mask_rcnn_cfg(num_classes=3, components="plugin")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg).eval()
    assert type(model.proposal_generator).__name__ == "PerLevelRPN"  # the plugin's model
    # Zero the delta predictors so proposals are anchors and detections are non-degenerate
    # (a random init otherwise collapses boxes onto the image border).
    for layer in (model.proposal_generator.rpn_head.anchor_deltas,
                  model.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    image = torch.rand(3, 96, 136) * 255
    return cfg, model, [{"image": image, "height": 96, "width": 136}]


def run(model, inputs):
    with torch.no_grad():
        return model(inputs)[0]["instances"]


def test_fp32_channels_last_matches_reference(model_and_inputs):
    _, model, inputs = model_and_inputs
    ref = run(model, inputs)
    enable_fast_inference(model, "fp32", channels_last=True)
    try:
        out = run(model, inputs)
    finally:
        disable_fast_inference(model)
    assert len(out) == len(ref) > 0
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=1e-4)


def test_bf16_path_returns_fp32_results_close_to_reference(model_and_inputs):
    _, model, inputs = model_and_inputs
    ref = run(model, inputs)
    enable_fast_inference(model, "bf16", channels_last=True)
    try:
        out = run(model, inputs)
        # The convs really ran in bf16: a backbone output differs from fp32, but is fp32-typed.
        feats = model.backbone(torch.rand(1, 3, 96, 128))
        assert all(f.dtype == torch.float32 for f in feats.values())
    finally:
        disable_fast_inference(model)
    assert out.scores.dtype == torch.float32
    assert out.pred_boxes.tensor.dtype == torch.float32
    assert len(out) > 0
    # bf16 has ~3 significant digits: scores agree to about 1e-2.
    assert (out.scores[: len(ref)].sort().values - ref.scores[: len(out)].sort().values).abs().max() < 0.05


def test_disable_restores_exact_outputs(model_and_inputs):
    _, model, inputs = model_and_inputs
    ref = run(model, inputs)
    enable_fast_inference(model, "bf16", channels_last=True)
    disable_fast_inference(model)
    out = run(model, inputs)
    assert torch.equal(out.pred_boxes.tensor, ref.pred_boxes.tensor)
    assert torch.equal(out.pred_masks, ref.pred_masks)
    assert "forward" not in model.backbone.__dict__


def test_prepare_for_inference_reads_config(model_and_inputs):
    cfg, model, inputs = model_and_inputs
    cfg = cfg.clone()
    cfg.MODEL.FAST_INFERENCE.PRECISION = "bf16"
    prepare_for_inference(model, cfg)
    try:
        assert model._fpn_plugin_fast_inference == ("bf16", False)
        assert len(run(model, inputs)) > 0
    finally:
        disable_fast_inference(model)


@pytest.mark.parametrize("precision,match", [("int8", "unknown value 'int8'"),
                                             ("fp16", "needs a CUDA device")])
def test_bad_precision_names_the_key(model_and_inputs, precision, match):
    _, model, _ = model_and_inputs
    with pytest.raises(ValueError, match="MODEL.FAST_INFERENCE.PRECISION") as info:
        enable_fast_inference(model, precision)
    assert match in str(info.value)
