"""
The pieces of fpn_plugin.deploy: the field lists (Detectron2's by default, ``proposal_levels``
only when asked for), refusals with their reasons, the fast path traced as it runs, a scripted
model that runs in a process without Detectron2, the loader of Detectron2's export helpers,
and the pairing of detections in the comparison.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import Boxes, Instances
from deploy_testutils import ROOT, assert_same_detections, sample_images, small_model

from fpn_plugin.deploy import (
    MASK_RCNN_FIELDS,
    DeployError,
    Tolerances,
    compare_detections,
    d2_export,
    eager_outputs,
    outputs_to_instances,
    plugin_fields,
    script_model,
    trace_model,
)
from fpn_plugin.deploy.onnx_export import check_onnx_exportable
from fpn_plugin.inference import enable_fast_inference

DEMO = "configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml"


def test_detectron2_export_helpers_load_on_this_detectron2():
    patch = d2_export.torchscript_patch()
    assert d2_export.torchscript_patch() is patch  # loaded once
    assert callable(patch.patch_instances) and callable(d2_export.TracingAdapter)
    try:
        import detectron2.export  # noqa: F401  (main: caffe2 optional)
    except ImportError:  # v0.6: the package imports caffe2; its own files, loaded apart
        assert patch.__name__ == f"{d2_export.STANDIN_PACKAGE}.torchscript_patch"
        assert d2_export.source().startswith(d2_export.STANDIN_PACKAGE)
    else:
        assert patch.__name__ == "detectron2.export.torchscript_patch"
        assert d2_export.TracingAdapter is detectron2.export.TracingAdapter
    with pytest.raises(ValueError, match="caffe2-free"):
        d2_export.export_module("api")


def test_recorded_levels_are_the_one_extra_field():
    default = small_model(DEMO)
    recording = small_model(DEMO, **{"MODEL.RPN.RECORD_PROPOSAL_LEVELS": True})
    assert plugin_fields(default) == MASK_RCNN_FIELDS
    assert plugin_fields(recording) == dict(MASK_RCNN_FIELDS, proposal_levels=torch.Tensor)
    # Every extra field: also MaskScoringHead's (tests/mask_head/test_mask_scoring.py).
    assert plugin_fields() == dict(plugin_fields(recording), mask_scores=torch.Tensor)
    # Detectron2's list cannot script a model that sets another field; the helper's can.
    with pytest.raises(Exception, match="proposal_levels"):
        script_model(recording, MASK_RCNN_FIELDS)
    scripted = script_model(recording)
    image = sample_images()[0]
    with torch.no_grad():
        assert_same_detections(outputs_to_instances(scripted(image)),
                               eager_outputs(recording, image))
        images = recording.preprocess_image([{"image": image}])
        proposals, _ = recording.proposal_generator(images, recording.backbone(images.tensor))
    assert proposals[0].proposal_levels.dtype == torch.int64


def test_record_proposal_levels_must_be_a_bool():
    with pytest.raises(ValueError, match="MODEL.RPN.RECORD_PROPOSAL_LEVELS"):
        small_model(DEMO, **{"MODEL.RPN.RECORD_PROPOSAL_LEVELS": "'yes'"})


def test_fast_path_is_traced_as_it_runs():
    model = enable_fast_inference(small_model(DEMO), "bf16", channels_last=True)
    images = sample_images()
    traced = trace_model(model, images[0])
    assert "BFloat16" in str(traced.inlined_graph)  # the autocast casts are in the graph
    for image in images:
        with torch.no_grad():
            assert_same_detections(outputs_to_instances(traced(image)),
                                   eager_outputs(model, image))


def test_what_cannot_be_deployed_is_refused_with_the_reason():
    model = enable_fast_inference(small_model(DEMO), "bf16")
    with pytest.raises(DeployError, match="TorchScript cannot compile.*--method trace"):
        script_model(model)
    with pytest.raises(DeployError, match="no bf16 Conv"):
        check_onnx_exportable(model, 17)
    with pytest.raises(DeployError, match="opset >= 16"):
        check_onnx_exportable(small_model(DEMO), 11)
    with pytest.raises(DeployError, match="MODEL.MASK_ON"):
        trace_model(small_model(DEMO, **{"MODEL.MASK_ON": False}), sample_images()[0])
    with pytest.raises(DeployError, match="eval mode"):
        trace_model(small_model(DEMO).train(), sample_images()[0])


def test_scripted_model_runs_where_detectron2_is_not_installed(tmp_path):
    model = small_model(DEMO)
    image = sample_images()[1]
    path = str(tmp_path / "model.ts")
    torch.jit.save(script_model(model), path)
    torch.save(image, str(tmp_path / "image.pt"))
    want = eager_outputs(model, image)
    # detectron2 (and fpn_plugin) made unimportable; torchvision registers nms / roi_align.
    code = (
        "import sys, json; sys.modules['detectron2'] = None; sys.modules['fpn_plugin'] = None\n"
        "import torch, torchvision\n"
        f"m = torch.jit.load({path!r})\n"
        f"out = m(torch.load({str(tmp_path / 'image.pt')!r}))\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=env)
    got = outputs_to_instances(torch.load(str(tmp_path / "out.pt")))
    assert_same_detections(got, want)
    assert json.loads(json.dumps(list(got.image_size))) == list(image.shape[1:])


def _instances(boxes, scores, classes, size=(40, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(boxes)
    return Instances(size, pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                     scores=torch.tensor(scores), pred_classes=torch.tensor(classes),
                     pred_masks=torch.rand(n, 1, 6, 6, generator=g))


def test_comparison_pairs_swapped_near_ties_and_counts_the_rest():
    boxes = [[2.0, 2.0, 20.0, 20.0], [5.0, 3.0, 30.0, 25.0], [10.0, 10.0, 35.0, 38.0]]
    eager = _instances(boxes, [0.9, 0.50001, 0.5], [0, 1, 1])
    swapped = eager[torch.tensor([0, 2, 1])]
    diff = compare_detections(eager, swapped, 80, 80)
    assert diff.paired == 3 and diff.unpaired == 0 and not diff.same_order
    assert diff.max_box_diff == diff.max_score_diff == diff.max_mask_diff == 0
    assert diff.within(Tolerances()) and not diff.bitwise_equal
    assert compare_detections(eager, eager, 80, 80).bitwise_equal

    moved = _instances(boxes, [0.9, 0.50001, 0.5], [0, 1, 1])
    moved.pred_boxes.tensor[1] += 0.25
    diff = compare_detections(eager, moved, 80, 80)
    assert diff.max_box_diff == pytest.approx(0.25)
    assert not diff.within(Tolerances()) and diff.within(Tolerances(boxes=0.3))

    # Zero-width boxes (untrained models emit them) have no IoU but pair by distance.
    thin = _instances([[1.25, 0.0, 1.25, 40.0], [0.5, 0.0, 0.5, 40.0]], [0.8, 0.8], [0, 0])
    assert compare_detections(thin, thin[torch.tensor([1, 0])], 80, 80).paired == 2

    missing = compare_detections(eager, eager[torch.tensor([0, 1])], 80, 80)
    other_class = _instances(boxes, [0.9, 0.50001, 0.5], [0, 1, 2])
    assert missing.unpaired == 1 and not missing.within(Tolerances())
    assert compare_detections(eager, other_class, 80, 80).unpaired == 2


def test_tolerances_are_checked():
    with pytest.raises(ValueError, match="tolerance boxes"):
        Tolerances(boxes=-1.0)


def test_docs_describe_the_interface():
    # The deploy guide lists the outputs in the order the deployed models return them.
    with open(os.path.join(ROOT, "docs", "deploy.md")) as f:
        text = f.read()
    assert "pred_boxes, pred_classes, pred_masks, scores, image_size" in text
