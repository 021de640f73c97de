"""
:class:`Predictor`: a model ready for inference from a config and a checkpoint, shaped like
Detectron2's ``DefaultPredictor`` (build the model, load the weights, resize each image as at
test time, run without gradients), with what the plugin's entries need on top:

- the weights are loaded by :class:`~fpn_plugin.checkpoint.SafeDetectionCheckpointer`, which
  never runs code from the file, and strictly (keys or shapes that differ are an error);
- ``MODEL.FAST_INFERENCE`` is applied (:func:`fpn_plugin.inference.prepare_for_inference`);
- a CUDA ``MODEL.DEVICE`` on a machine without CUDA, and a missing weights file, are refused
  before the model is built, naming the key or file (:func:`check_weights`).

Export (``fpn_plugin.export``), deploy (``fpn_plugin.deploy``) and the demo run models through
it.
"""
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..checkpoint import CheckpointError, SafeDetectionCheckpointer, split_checkpoint_query
from ..utils.config import with_missing_keys
from ..utils.env import check_cuda_available
from . import prepare_for_inference
from .config import add_inference_config

__all__ = ["Predictor", "build_test_resize", "check_weights", "resize_for_model"]


def check_weights(weights: Optional[str]) -> str:
    """
    Return ``weights`` if it names a checkpoint that can be read (a local file that exists, or
    a URL); else raise naming the option.

    Raises:
        ValueError: no weights given.
        CheckpointError: a local file that does not exist.
    """
    if not weights:
        raise ValueError("no weights: pass --weights (weights=) or set MODEL.WEIGHTS")
    local, _ = split_checkpoint_query(weights)
    if "://" not in local and not os.path.isfile(local):
        raise CheckpointError(f"checkpoint file not found (--weights): {weights!r}")
    return weights


def build_test_resize(cfg) -> T.AugmentationList:
    """The test-time resize of ``cfg`` (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``)."""
    return T.AugmentationList(d2_utils.build_augmentation(cfg, is_train=False))


def resize_for_model(resize: T.AugmentationList, image: np.ndarray) -> torch.Tensor:
    """
    Args:
        resize: from :func:`build_test_resize`.
        image: (H, W, C) uint8 in ``INPUT.FORMAT``.

    Returns:
        (C, H', W') uint8 tensor: the model's input for the image.
    """
    aug_input = T.AugInput(image)
    resize(aug_input)
    return torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))


class Predictor:
    """
    Build the model of ``cfg``, load ``weights`` safely and strictly, apply the fast inference
    path; then ``predictor(image)`` returns the model's output for one image.

    Args:
        cfg (CfgNode): the model's config (``MODEL.DEVICE`` is where it runs); without the
            plugin's ``MODEL.FAST_INFERENCE`` keys, their defaults (fp32).
        weights (str): checkpoint file or URL; None uses ``MODEL.WEIGHTS``.

    Attributes:
        model: the model, in eval mode.
        weights (str): the checkpoint loaded.
    """

    def __init__(self, cfg, weights: Optional[str] = None):
        cfg = with_missing_keys(cfg, (add_inference_config,))
        check_cuda_available(cfg.MODEL.DEVICE)
        self.weights = check_weights(weights or cfg.MODEL.WEIGHTS)
        self.model = build_model(cfg)
        self.model.eval()
        SafeDetectionCheckpointer(self.model, strict=True).load(self.weights, checkpointables=[])
        prepare_for_inference(self.model, cfg)
        self.resize = build_test_resize(cfg)

    def __call__(self, image: np.ndarray, inputs: Optional[Dict[str, Any]] = None
                 ) -> Dict[str, Any]:
        """
        Args:
            image (np.ndarray): (H, W, C) uint8 in ``INPUT.FORMAT``.
            inputs (dict): more fields of the model's input, e.g. ``image_id`` for evaluators;
                the outputs are scaled to ``height`` / ``width`` (default: the image's size).

        Returns:
            dict: the model's output for the image ("instances" on the model's device).
        """
        model_input = {"height": image.shape[0], "width": image.shape[1], **(inputs or {})}
        model_input["image"] = resize_for_model(self.resize, image)
        with torch.no_grad():
            return self.model([model_input])[0]
