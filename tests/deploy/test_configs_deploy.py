"""
The whole Mask R-CNN of every config in configs/ (small: see deploy_testutils.SMALL) deploys
the ways Detectron2 deploys its own: it scripts with Detectron2's documented field list
(``scripting_with_instances``), traces with ``TracingAdapter``, and the trace exports to ONNX
and runs in ONNX Runtime. Scripted and traced models give the eager detections bit for bit
(boxes, scores, classes, masks), at the traced input size and at another one, after a save /
load round trip; ONNX Runtime gives them within the deploy check's tolerances (other kernels).
"""
import io

import pytest
import torch
from deploy_testutils import CONFIGS, assert_same_detections, sample_images, small_model

from fpn_plugin.deploy import (
    MASK_RCNN_FIELDS,
    OnnxRuntimeModel,
    Tolerances,
    compare_detections,
    eager_outputs,
    export_onnx,
    outputs_to_instances,
    plugin_fields,
    script_model,
    trace_model,
)


def test_every_model_config_is_covered():
    assert "configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml" in CONFIGS
    assert len([c for c in CONFIGS if c.startswith("configs/COCO-InstanceSegmentation/")]) >= 12


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda p: p.split("/")[-1][:-5])
def case(request):
    """The config's small model, two inputs of different sizes and their eager detections;
    module scope, so the tests of one config run together and share the model."""
    model = small_model(request.param)
    images = sample_images()
    return {"path": request.param, "model": model, "images": images,
            "eager": [eager_outputs(model, image) for image in images]}


def _traced(case):
    if "traced" not in case:  # shared by the TorchScript and ONNX tests of a config
        case["traced"] = trace_model(case["model"], case["images"][0])
    return case["traced"]


def _reloaded(module):
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_scripts_with_detectron2_fields_and_equals_eager(case):
    model = case["model"]
    # Nothing beyond Detectron2's list is set by a config's model: the default scripts with it.
    # The one exception is the mask-scoring head's own field, declared by plugin_fields.
    fields = dict(MASK_RCNN_FIELDS)
    if "mask_scoring" in case["path"]:
        fields["mask_scores"] = torch.Tensor
    assert plugin_fields(model) == fields
    keys = list(model.state_dict())
    scripted = _reloaded(script_model(model, fields))
    assert list(model.state_dict()) == keys  # the eager model is left as it was
    for image, want in zip(case["images"], case["eager"]):
        with torch.no_grad():
            assert_same_detections(outputs_to_instances(scripted(image)), want)


def test_traces_and_equals_eager_at_another_size(case):
    traced = _reloaded(_traced(case))
    # images[0] is the traced input; images[1] has another height and width.
    for image, want in zip(case["images"], case["eager"]):
        with torch.no_grad():
            assert_same_detections(outputs_to_instances(traced(image)), want)


def test_onnx_runs_in_onnxruntime_like_eager(case, tmp_path):
    pytest.importorskip("onnxruntime")
    path = str(tmp_path / "model.onnx")
    export_onnx(_traced(case), case["images"][0], path)
    session = OnnxRuntimeModel(path, num_threads=1)
    for image, want in zip(case["images"], case["eager"]):
        diff = compare_detections(want, outputs_to_instances(session(image)), *image.shape[1:])
        assert diff.paired == diff.eager_detections == diff.deployed_detections > 0
        assert diff.within(Tolerances()), diff
