"""Small builders shared by the mask-head tests: configs, ROI features, instances with GT masks."""
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances, PolygonMasks

from model_testutils import tiny_mask_rcnn_cfg as shared_tiny_mask_rcnn_cfg

from fpn_plugin import add_fpn_plugin_config


def mask_cfg(name, num_classes=3, num_conv=2, conv_dim=16, **roi_mask_head):
    """A config with a small mask head; extra ROI_MASK_HEAD keys as keyword arguments."""
    cfg = get_cfg()
    add_fpn_plugin_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    return _set_mask_head(cfg, name, num_conv, conv_dim, **roi_mask_head)


def _set_mask_head(cfg, name, num_conv, conv_dim, **roi_mask_head):
    head = cfg.MODEL.ROI_MASK_HEAD
    head.NAME = name
    head.NUM_CONV = num_conv
    head.CONV_DIM = conv_dim
    for key, value in roi_mask_head.items():
        if key.startswith("PANET_"):
            head.PANET[key[len("PANET_"):]] = value
        else:
            head[key] = value
    return cfg


def randomize_(module, seed=0, std=0.3):
    """Replace every parameter with N(0, std) so logits are far from the near-zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def _square_polygon(x0, y0, x1, y1):
    # A diamond inside the box, so crops are neither all-0 nor all-1.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [[cx, y0, x1, cy, cx, y1, x0, cy]]


def _instances(boxes_per_image, num_classes, image_size, seed, box_field, class_field):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for boxes in boxes_per_image:
        inst = Instances(image_size)
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        inst.set(box_field, Boxes(boxes))
        inst.set(class_field, torch.randint(num_classes, (len(boxes),), generator=gen))
        out.append((inst, boxes, gen))
    return out


def training_instances(boxes_per_image, num_classes, image_size=(64, 64), seed=0):
    """
    Foreground proposals as ROIHeads hands them to the mask head in training: fields
    proposal_boxes, gt_classes, gt_masks (polygons slightly offset from the proposals).
    """
    made = _instances(
        boxes_per_image, num_classes, image_size, seed, "proposal_boxes", "gt_classes"
    )
    for inst, boxes, _ in made:
        inst.gt_masks = PolygonMasks(
            [_square_polygon(*(b + torch.tensor([2.0, -1.0, 3.0, 2.0])).tolist()) for b in boxes]
        )
    return [inst for inst, _, _ in made]


def inference_instances(boxes_per_image, num_classes, image_size=(64, 64), seed=0):
    """Detections as the box head hands them to the mask head: pred_boxes, pred_classes, scores."""
    made = _instances(boxes_per_image, num_classes, image_size, seed, "pred_boxes", "pred_classes")
    for inst, boxes, gen in made:
        inst.scores = torch.rand(len(boxes), generator=gen)
    return [inst for inst, _, _ in made]


class HeadLayers(torch.nn.Module):
    """A mask head's ``layers`` as a module's forward (what ``torch.jit.trace`` traces)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, pooled):
        return self.head.layers(pooled)


BOXES = [
    [[4.0, 4.0, 30.0, 40.0], [10.0, 20.0, 60.0, 50.0], [0.0, 0.0, 63.0, 63.0]],
    [[16.0, 8.0, 24.0, 20.0], [30.0, 30.0, 50.0, 61.0]],
]


def tiny_mask_rcnn_cfg(mask_head_name, **roi_mask_head):
    """
    Mask R-CNN small enough for CPU tests: the shared tiny model (Detectron2's own ResNet-18
    FPN backbone and RPN, so only the mask head differs between compared models), narrowed
    to a 16-channel pyramid on 64 px images; extra ROI_MASK_HEAD keys as keyword arguments.
    """
    cfg = shared_tiny_mask_rcnn_cfg(num_classes=3)
    add_fpn_plugin_config(cfg)
    _set_mask_head(cfg, mask_head_name, num_conv=2, conv_dim=16, **roi_mask_head)
    defaults = get_cfg()
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = defaults.MODEL.RPN.PRE_NMS_TOPK_TEST
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep detections to compare
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 7
    cfg.TEST.DETECTIONS_PER_IMAGE = defaults.TEST.DETECTIONS_PER_IMAGE
    cfg.INPUT.MAX_SIZE_TEST = 64
    return cfg


def tiny_batch(num_images=2, size=64, seed=0):
    """Dataset dicts as the mapper yields them: CHW uint8 image and GT instances with masks."""
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        image = torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)
        inst = Instances((size, size))
        boxes = torch.tensor([[6.0, 8.0, 30.0, 40.0], [28.0, 20.0, 60.0, 58.0]]) + i
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([i % 3, (i + 1) % 3])
        inst.gt_masks = PolygonMasks([_square_polygon(*b.tolist()) for b in boxes])
        batch.append({"image": image, "height": size, "width": size, "instances": inst})
    return batch
