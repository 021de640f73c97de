"""
Deployment of the plugin's Mask R-CNN the way Detectron2 deploys its own (TorchScript,
ONNX).

- :mod:`.fields`: the ``Instances`` field lists (:func:`plugin_fields`);
- :mod:`.d2_export`: Detectron2's export helpers on v0.6 (without caffe2) and main.
"""
from .fields import MASK_RCNN_FIELDS, PLUGIN_EXTRA_FIELDS, plugin_fields

__all__ = ["MASK_RCNN_FIELDS", "PLUGIN_EXTRA_FIELDS", "plugin_fields"]
