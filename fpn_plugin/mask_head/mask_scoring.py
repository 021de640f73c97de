"""
``MaskScoringHead``: Mask Scoring R-CNN's mask head (Huang, Huang, Gong, Huang and Wang,
*Mask Scoring R-CNN*, CVPR 2019): the plain FCN head (:class:`ConvUpsampleMaskHead`, built
as it is and its layers kept under their own names) and a MaskIoU branch that predicts, per
ROI and class, the IoU of the predicted mask with the ground truth.

- MaskIoU branch (:class:`MaskIoUBranch`, ``maskiou_head.*``): the ROI features `(B, C, R, R)`
  concatenated with the predicted mask of the ROI's class `(B, 1, 2R, 2R)` max-pooled to R;
  ``NUM_CONV`` 3x3 convs (the last with stride 2), ``NUM_FC`` fc layers and a linear
  predictor of one IoU per class (paper: 4 convs of 256, 2 fc of 1024).
- Training: ``loss_mask`` as the plain head's, and ``loss_maskiou`` = ``LOSS_WEIGHT`` x the
  mean squared error between the predicted IoU of each foreground ROI's ground-truth class
  and the IoU of its binarized predicted mask (logit > 0) with its ground-truth mask, both on
  the head's 2R x 2R grid over the ROI (:func:`mask_iou_targets`). The mask enters the
  branch detached: the branch learns to score masks; it does not train the mask.
- Inference: ``pred_masks`` as the plain head's; the instances get a field ``mask_scores`` =
  ``scores`` x the predicted IoU of the predicted class (clamped to [0, 1]), the score of the
  mask results; ``scores`` stays the classifier's, the score of the box results (as in the
  paper). The field is declared for scripting by ``fpn_plugin.deploy.plugin_fields`` and used
  for "segm" records by ``fpn_plugin.export.instances_to_coco_results``.

Checkpoints of the plain head (the plugin's or Detectron2's ``MaskRCNNConvUpsampleHead``)
load into this head with only ``maskiou_head.*`` missing (freshly initialised).
"""
import math
from typing import List, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    BaseMaskRCNNHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import Instances
from torch import Tensor, nn

from ..layers import conv3x3, prepared_copy
from ..utils.config import require_plugin_keys
from ..utils.registry import register
from .config import add_mask_head_config, head_args_from_config
from .conv_upsample import ConvUpsampleMaskHead

__all__ = ["MaskScoringHead", "MaskIoUBranch", "mask_iou_targets", "rescore_masks"]


class MaskIoUBranch(nn.Module):
    """
    The MaskIoU head: `(B, C, R, R)` ROI features and `(B, 1, 2R, 2R)` mask probabilities ->
    `(B, num_classes)` predicted mask IoUs. Parameters: ``convs.{k}`` (3x3, ReLU; the last
    stride 2), ``fcs.{k}`` (linear, ReLU), ``predictor``.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        num_classes: int,
        conv_dims: List[int],
        fc_dims: List[int],
    ):
        """
        Args:
            in_channels (int): C of the ROI features (the mask is one more input channel).
            resolution (int): R, their side.
            num_classes (int): IoUs predicted per ROI (1 for class-agnostic masks).
            conv_dims (list[int]): output channels of the 3x3 convs (>= 1 of them).
            fc_dims (list[int]): output sizes of the fc layers before the predictor.
        """
        super().__init__()
        convs = []
        channels = in_channels + 1
        for k, dim in enumerate(conv_dims):
            stride = 2 if k == len(conv_dims) - 1 else 1
            convs.append(conv3x3(channels, dim, stride=stride, relu=True))
            channels = dim
        self.convs = nn.Sequential(*convs)
        side = math.ceil(resolution / 2)
        fcs = []
        size = channels * side * side
        for dim in fc_dims:
            fcs += [nn.Linear(size, dim), nn.ReLU()]
            size = dim
        self.fcs = nn.Sequential(*fcs)
        self.predictor = nn.Linear(size, num_classes)
        for conv in convs:
            weight_init.c2_msra_fill(conv)
        for fc in self.fcs:
            if isinstance(fc, nn.Linear):
                weight_init.c2_xavier_fill(fc)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 0)

    def forward(self, features: Tensor, mask_probs: Tensor) -> Tensor:
        """
        Args:
            features (Tensor): `(B, C, R, R)` ROI features.
            mask_probs (Tensor): `(B, 1, 2R, 2R)` predicted mask probabilities.

        Returns:
            Tensor: `(B, num_classes)` predicted IoUs.
        """
        pooled = F.max_pool2d(mask_probs, kernel_size=2, stride=2)
        x = self.convs(torch.cat([features, pooled], dim=1))
        return self.predictor(self.fcs(torch.flatten(x, 1)))


@torch.jit.unused
def mask_iou_targets(pred_mask_logits: Tensor, instances: List[Instances]) -> Tuple[Tensor, Tensor]:
    """
    The ground-truth class of each foreground ROI and the IoU of its binarized predicted mask
    with its ground-truth mask, on the head's M x M grid over the ROI.

    Args:
        pred_mask_logits (Tensor): `(B, K, M, M)` mask logits (K = 1: class-agnostic) of the
            B foreground ROIs, in the order of ``instances``.
        instances (list[Instances]): per image, the foreground proposals with
            ``proposal_boxes``, ``gt_classes`` and ``gt_masks``.

    Returns:
        Tensor: `(B,)` int64 class index into K (0 when K = 1).
        Tensor: `(B,)` float IoUs in [0, 1] (0 when both masks are empty).
    """
    side = pred_mask_logits.shape[2]
    classes, gt_masks = [], []
    for per_image in instances:
        if len(per_image) == 0:
            continue
        classes.append(per_image.gt_classes.to(dtype=torch.int64))
        gt_masks.append(
            per_image.gt_masks.crop_and_resize(per_image.proposal_boxes.tensor, side)
            .to(device=pred_mask_logits.device)
        )
    if not classes:
        empty = pred_mask_logits.new_zeros((0,))
        return empty.long(), empty
    classes = cat(classes)
    if pred_mask_logits.shape[1] == 1:
        classes = torch.zeros_like(classes)
    gt = cat(gt_masks) > 0.5
    rows = torch.arange(pred_mask_logits.shape[0], device=pred_mask_logits.device)
    pred = pred_mask_logits[rows, classes] > 0
    intersection = (pred & gt).sum(dim=(1, 2)).float()
    union = (pred | gt).sum(dim=(1, 2)).float()
    return classes, intersection / union.clamp(min=1.0)


def rescore_masks(scores: Tensor, mask_ious: Tensor) -> Tensor:
    """
    The mask results' score: the detection score times the predicted mask IoU, the IoU
    clamped to [0, 1] (a regression can step outside it).

    Args:
        scores (Tensor): `(N,)` detection scores.
        mask_ious (Tensor): `(N,)` predicted IoUs of the predicted class.

    Returns:
        Tensor: `(N,)`.
    """
    return scores * mask_ious.clamp(min=0.0, max=1.0)


@register(ROI_MASK_HEAD_REGISTRY)
class MaskScoringHead(BaseMaskRCNNHead):
    """
    :class:`ConvUpsampleMaskHead` + the MaskIoU branch (module docstring). Parameters: the
    plain head's (``mask_fcn{k}``, ``deconv`` or ``upsample_conv``, ``predictor``) under their
    names, and ``maskiou_head.*``.
    """

    # Read by fpn_plugin.deploy.fields: this head sets the Instances field "mask_scores".
    sets_mask_scores = True

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        maskiou_num_conv: int = 4,
        maskiou_conv_dim: int = 256,
        maskiou_num_fc: int = 2,
        maskiou_fc_dim: int = 1024,
        maskiou_loss_weight: float = 1.0,
        **fcn_kwargs,
    ):
        """
        Args:
            input_shape, num_classes: as :class:`ConvUpsampleMaskHead` (checked by it).
            maskiou_num_conv (int): the MaskIoU branch's 3x3 convs, >= 1
                (MODEL.ROI_MASK_HEAD.MASK_SCORING.NUM_CONV), each ``maskiou_conv_dim``
                channels (CONV_DIM).
            maskiou_num_fc (int): its fc layers, >= 0 (NUM_FC), each ``maskiou_fc_dim`` wide
                (FC_DIM).
            maskiou_loss_weight (float): multiplier of ``loss_maskiou``, >= 0 (LOSS_WEIGHT).
            fcn_kwargs: the plain head's other arguments (``conv_dims``, ``conv_norm``,
                ``upsample_mode``, ``loss_weight``, ``vis_period``), as
                :class:`ConvUpsampleMaskHead`.

        Raises:
            ValueError: on an invalid argument, naming the config key that sets it.
        """
        fcn = ConvUpsampleMaskHead(input_shape, num_classes=num_classes, **fcn_kwargs)
        super().__init__(loss_weight=fcn.loss_weight, vis_period=fcn.vis_period)
        _check_maskiou_args(
            maskiou_num_conv, maskiou_conv_dim, maskiou_num_fc, maskiou_fc_dim, maskiou_loss_weight
        )
        # The plain head's layers under their own names (its checkpoints load), applied in
        # order from a plain list (__prepare_scriptable__ makes it a ModuleList).
        self._fcn_names = tuple(name for name, _ in fcn.named_children())
        for name, layer in fcn.named_children():
            self.add_module(name, layer)
        self.fcn_layers = list(fcn.children())
        self.maskiou_head = MaskIoUBranch(
            input_shape.channels, input_shape.height, num_classes,
            [maskiou_conv_dim] * maskiou_num_conv, [maskiou_fc_dim] * maskiou_num_fc,
        )
        self.maskiou_loss_weight = float(maskiou_loss_weight)

    @classmethod
    def from_config(cls, cfg, input_shape):
        require_plugin_keys(cfg, add_mask_head_config, "MaskScoringHead")
        args = head_args_from_config(cfg, input_shape)
        scoring = cfg.MODEL.ROI_MASK_HEAD.MASK_SCORING
        args.update(
            maskiou_num_conv=scoring.NUM_CONV,
            maskiou_conv_dim=scoring.CONV_DIM,
            maskiou_num_fc=scoring.NUM_FC,
            maskiou_fc_dim=scoring.FC_DIM,
            maskiou_loss_weight=scoring.LOSS_WEIGHT,
        )
        return args

    def layers(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): pooled ROI features `(B, C, R, R)`.

        Returns:
            Tensor: mask logits `(B, num_classes, 2R, 2R)` (the plain head's).
        """
        for layer in self.fcn_layers:
            x = layer(x)
        return x

    def forward(self, x: Tensor, instances: List[Instances]):
        """
        Args:
            x (Tensor): pooled ROI features `(B, C, R, R)`.
            instances (list[Instances]): training: the foreground proposals per image (with
                ground truth); inference: the detections per image.

        Returns:
            Training: dict with ``loss_mask`` and ``loss_maskiou``. Inference: ``instances``
            with ``pred_masks`` `(N, 1, 2R, 2R)` and ``mask_scores`` `(N,)` set.
        """
        logits = self.layers(x)
        if self.training:
            return self._losses(x, logits, instances)
        mask_rcnn_inference(logits, instances)
        classes = cat([i.pred_classes for i in instances])
        if logits.shape[1] == 1:
            classes = torch.zeros_like(classes)
        rows = torch.arange(logits.shape[0], device=logits.device)
        ious = self.maskiou_head(x, logits[rows, classes].unsqueeze(1).sigmoid())
        ious = ious[rows, classes]
        # Shapes, not len(): a trace keeps them as values (other detection counts work).
        num_per_image = [i.pred_classes.shape[0] for i in instances]
        for per_image, iou in zip(instances, ious.split(num_per_image)):
            per_image.mask_scores = rescore_masks(per_image.scores, iou)
        return instances

    @torch.jit.unused
    def _losses(self, x: Tensor, logits: Tensor, instances: List[Instances]):
        loss_mask = mask_rcnn_loss(logits, instances, self.vis_period) * self.loss_weight
        losses = {"loss_mask": loss_mask}
        classes, targets = mask_iou_targets(logits, instances)
        rows = torch.arange(logits.shape[0], device=logits.device)
        mask_probs = logits.detach()[rows, classes].unsqueeze(1).sigmoid()
        pred = self.maskiou_head(x, mask_probs)[rows, classes]
        if pred.numel() == 0:
            loss = pred.sum() * 0.0
        else:
            loss = F.mse_loss(pred, targets)
        losses["loss_maskiou"] = loss * self.maskiou_loss_weight
        return losses

    def __prepare_scriptable__(self):
        """A copy for ``torch.jit.script`` with the plain head's layers in one ModuleList
        (the copy's state-dict keys change accordingly, as for the neck; it shares this
        head's layers: :func:`fpn_plugin.layers.prepared_copy`)."""
        ret = prepared_copy(self)
        layers = [getattr(ret, name) for name in self._fcn_names]
        for name in self._fcn_names:
            delattr(ret, name)
        ret.fcn_layers = nn.ModuleList(layers)
        return ret


def _check_maskiou_args(num_conv, conv_dim, num_fc, fc_dim, loss_weight) -> None:
    key = "MODEL.ROI_MASK_HEAD.MASK_SCORING"
    for name, value, least in (("NUM_CONV", num_conv, 1), ("CONV_DIM", conv_dim, 1),
                               ("NUM_FC", num_fc, 0), ("FC_DIM", fc_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key}.{name} must be an int >= {least}, got {value!r}")
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
            or not loss_weight >= 0:
        raise ValueError(f"{key}.LOSS_WEIGHT must be a number >= 0, got {loss_weight!r}")
