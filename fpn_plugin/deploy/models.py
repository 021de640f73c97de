"""
The deployable Mask R-CNN: one image in, the model's detections out, scripted or traced.

Every deployed form (scripted or traced TorchScript, ONNX) has one interface, Detectron2's
``model.inference([{"image": image}], do_postprocess=False)[0]`` flattened the way Detectron2's
``TracingAdapter`` flattens it:

- input ``image``: float32 ``(3, H, W)``, pixel values in ``INPUT.FORMAT`` channel order,
  already resized as Detectron2's ``DefaultPredictor`` resizes (``INPUT.MIN_SIZE_TEST`` /
  ``MAX_SIZE_TEST``); the model normalizes and pads it itself.
- outputs, in :data:`OUTPUT_NAMES` order: ``pred_boxes`` ``(R, 4)`` float32 XYXY in the input's
  pixels, ``pred_classes`` ``(R,)`` int64, ``pred_masks`` ``(R, 1, M, M)`` float32 mask
  probabilities inside each box (M = 2 x ``ROI_MASK_HEAD.POOLER_RESOLUTION``), ``scores``
  ``(R,)`` float32, ``image_size`` ``(2,)`` int64 = (H, W).

Scaling to the original image size and pasting the masks into it (Detectron2's
``detector_postprocess``, :func:`postprocess`) stay outside, as in Detectron2's own export:
deployments usually want the box-local masks, and pasting is resolution-dependent work that
the caller can place (and batch) where it fits.
"""
import copy
import warnings
from typing import Dict, Optional, Tuple

import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from . import d2_export
from .fields import plugin_fields

__all__ = [
    "OUTPUT_NAMES",
    "DeployError",
    "ScriptableMaskRCNN",
    "check_deployable",
    "eager_outputs",
    "outputs_to_instances",
    "postprocess",
    "script_model",
    "trace_model",
]

OUTPUT_NAMES = ("pred_boxes", "pred_classes", "pred_masks", "scores", "image_size")
METHODS = ("trace", "script")


class DeployError(ValueError):
    """The model cannot be deployed the way asked; the message says why and what works."""


def _fast_path(model: nn.Module) -> Optional[Tuple[str, bool]]:
    """(precision, channels_last) if ``enable_fast_inference`` is on, else None."""
    return getattr(model, "_fpn_plugin_fast_inference", None)


def check_deployable(model: nn.Module, method: str) -> None:
    """
    Raise :class:`DeployError` unless ``model`` is an eval-mode Mask R-CNN (Detectron2's
    ``GeneralizedRCNN`` with a mask head) that ``method`` ("trace" or "script") can compile.
    """
    if method not in METHODS:
        raise DeployError(f"--method must be one of {list(METHODS)}, got {method!r}")
    if not isinstance(model, GeneralizedRCNN):
        raise DeployError(
            "fpn_plugin.deploy exports Mask R-CNN: MODEL.META_ARCHITECTURE must be "
            f"'GeneralizedRCNN', got a {type(model).__name__}"
        )
    if not getattr(model.roi_heads, "mask_on", False):
        raise DeployError("fpn_plugin.deploy exports Mask R-CNN: set MODEL.MASK_ON True")
    if model.training:
        raise DeployError("the model must be in eval mode (model.eval()): deployment is inference")
    fast = _fast_path(model)
    if method == "script" and fast is not None:
        raise DeployError(
            f"MODEL.FAST_INFERENCE (PRECISION {fast[0]!r}, CHANNELS_LAST {fast[1]}) wraps module "
            "forwards in Python closures (autocast, memory format), which TorchScript cannot "
            "compile: use --method trace (the trace records the reduced-precision casts) or "
            "set MODEL.FAST_INFERENCE.PRECISION fp32 and CHANNELS_LAST False"
        )


class ScriptableMaskRCNN(nn.Module):
    """
    ``GeneralizedRCNN`` with the deployable interface (module docstring): a tuple of tensors
    out, so a scripted model needs no Detectron2 class to be loaded and run (Detectron2's
    ``tools/deploy/export_model.py`` wraps its scripted models for the same reason).
    """

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``image`` (3, H, W) -> the :data:`OUTPUT_NAMES` tensors."""
        inputs = [{"image": image}]
        result = self.model.inference(inputs, do_postprocess=False)[0]
        height, width = result.image_size
        size = torch.tensor([height, width], dtype=torch.int64)
        return (result.pred_boxes.tensor, result.pred_classes, result.pred_masks, result.scores,
                size)


def script_model(model: GeneralizedRCNN, fields: Optional[Dict[str, type]] = None):
    """
    Script ``model`` with Detectron2's ``scripting_with_instances``.

    Args:
        model: an eval-mode plugin (or Detectron2) Mask R-CNN, fast path off.
        fields: the ``Instances`` fields to declare; default :func:`plugin_fields(model)
            <fpn_plugin.deploy.fields.plugin_fields>` (Detectron2's list, plus any extra
            field this model sets).

    Returns:
        torch.jit.ScriptModule: :class:`ScriptableMaskRCNN` compiled; ``torch.jit.save`` it.
    """
    check_deployable(model, "script")
    fields = plugin_fields(model) if fields is None else fields
    # Detectron2's patches (ResNet's stages as a ModuleList, StandardROIHeads' mask_on as a
    # constant), as its own export applies them.
    d2_export.torchscript_patch().patch_nonscriptable_classes()
    # A copy: torch.jit.script puts the __prepare_scriptable__ versions of submodules (neck,
    # ResNet) into their parents in place, which would change the eager model's state-dict
    # keys and make a second scripting fail.
    wrapper = ScriptableMaskRCNN(copy.deepcopy(model)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        return d2_export.scripting_with_instances(wrapper, fields)


def _inference(model: GeneralizedRCNN, image: Tensor) -> Instances:
    result = model.inference([{"image": image}], do_postprocess=False)[0]
    # Not (yet) part of the deployed interface: MaskScoringHead's mask scores (the scripted
    # wrapper returns OUTPUT_NAMES only, so both forms drop them alike).
    if result.has("mask_scores"):
        result.remove("mask_scores")
    return result


def trace_model(model: GeneralizedRCNN, image: Tensor):
    """
    Trace ``model`` on ``image`` with Detectron2's ``TracingAdapter``.

    The trace records the operations run for this image, with image-size arithmetic kept as
    graph operations, so it serves other sizes too (checked by the deploy command on the
    sample images and on a crop of the first one). A fast path on ``model``
    (``MODEL.FAST_INFERENCE``) is recorded as it ran: the reduced-precision casts are part
    of the graph.

    Args:
        model: an eval-mode Mask R-CNN.
        image: float32 ``(3, H, W)`` on the model's device, as the deployed model will get.

    Returns:
        torch.jit.ScriptModule: input ``image``, outputs :data:`OUTPUT_NAMES`.
    """
    check_deployable(model, "trace")
    adapter = d2_export.TracingAdapter(model, image, _inference).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace=False: the deploy command checks the saved trace against eager itself,
        # on several images and sizes (torch's check re-traces on the same input only).
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    keys = tuple(getattr(adapter.outputs_schema, "keys", ())) + ("image_size",)
    if keys != OUTPUT_NAMES:
        raise DeployError(
            f"the model's inference outputs fields {list(keys[:-1])}; the deployed interface "
            f"is Mask R-CNN's {list(OUTPUT_NAMES[:-1])}"
        )
    return traced


def outputs_to_instances(outputs) -> Instances:
    """The :data:`OUTPUT_NAMES` tensors (any order-preserving sequence, e.g. ONNX Runtime's
    arrays) as Detectron2 ``Instances`` at the input image's size."""
    tensors = [torch.as_tensor(x) for x in outputs]
    if len(tensors) != len(OUTPUT_NAMES):
        raise ValueError(f"expected {len(OUTPUT_NAMES)} outputs {OUTPUT_NAMES}, got {len(tensors)}")
    named = dict(zip(OUTPUT_NAMES, tensors))
    height, width = (int(v) for v in named.pop("image_size").tolist())
    boxes = named.pop("pred_boxes")
    return Instances((height, width), pred_boxes=Boxes(boxes), **named)


def eager_outputs(model: GeneralizedRCNN, image: Tensor) -> Instances:
    """What the deployed model computes, from the eager model (``do_postprocess=False``)."""
    with torch.no_grad():
        return _inference(model, image)


def postprocess(instances: Instances, height: int, width: int, mask_threshold: float = 0.5):
    """
    Detectron2's ``detector_postprocess``: boxes scaled to the original ``height`` x ``width``
    image, masks pasted into it (bool ``(R, height, width)``).
    """
    return detector_postprocess(instances, height, width, mask_threshold=mask_threshold)
