"""
Deployment of the plugin's Mask R-CNN the way Detectron2 deploys its own: TorchScript by
tracing (Detectron2's ``TracingAdapter``) or scripting (``scripting_with_instances``), and
ONNX from the trace, checked with ONNX Runtime. Command line: ``python -m fpn_plugin.deploy
--help``; guide: docs/deploy.md.

- :mod:`.fields`: the ``Instances`` field lists (:func:`plugin_fields`);
- :mod:`.models`: the deployable interface, :func:`script_model`, :func:`trace_model`;
- :mod:`.onnx_export`: :func:`export_onnx`, :class:`OnnxRuntimeModel`;
- :mod:`.compare`: eager vs deployed detections;
- :mod:`.deploy`: :func:`deploy_model` (what the command runs);
- :mod:`.d2_export`: Detectron2's export helpers on v0.6 (without caffe2) and main.
"""
from .compare import DetectionDiff, Tolerances, compare_detections
from .deploy import FORMATS, deploy_model
from .fields import MASK_RCNN_FIELDS, PLUGIN_EXTRA_FIELDS, plugin_fields
from .models import (
    OUTPUT_NAMES,
    DeployError,
    ScriptableMaskRCNN,
    eager_outputs,
    outputs_to_instances,
    postprocess,
    script_model,
    trace_model,
)
from .onnx_export import DEFAULT_OPSET, OnnxRuntimeModel, export_onnx

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "MASK_RCNN_FIELDS",
    "OUTPUT_NAMES",
    "PLUGIN_EXTRA_FIELDS",
    "DeployError",
    "DetectionDiff",
    "OnnxRuntimeModel",
    "ScriptableMaskRCNN",
    "Tolerances",
    "compare_detections",
    "deploy_model",
    "eager_outputs",
    "export_onnx",
    "outputs_to_instances",
    "plugin_fields",
    "postprocess",
    "script_model",
    "trace_model",
]
