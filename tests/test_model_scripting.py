"""
The whole Mask R-CNN built from the plugin's components scripts with Detectron2's
``scripting_with_instances`` and gives the eager detections and masks: the defaults with
Detectron2's own field list, and a model with every component in a variant that also records
proposal levels, and one with the BiFPN neck and the mask-scoring head (its ``mask_scores``),
with ``fpn_plugin.deploy.plugin_fields`` (every config in configs/:
tests/deploy/test_configs_deploy.py).
"""
import pytest
import torch
from detectron2.modeling import build_model
from jit_testutils import scripting_with_instances, torchscript_patch
from model_testutils import tiny_mask_rcnn_cfg

from fpn_plugin.deploy import MASK_RCNN_FIELDS, plugin_fields

VARIANTS = {
    "defaults": {},
    "pafpn-unshared-per_level-panet-levels": {
        "MODEL.FPN.BOTTOM_UP_PATH": True,
        "MODEL.FPN.FUSE_TYPE": "weighted",
        "MODEL.RPN.SHARED_HEAD": False,
        "MODEL.RPN.POST_NMS_TOPK_MODE": "per_level",
        "MODEL.RPN.POST_NMS_TOPK_TEST": 10,
        "MODEL.RPN.RECORD_PROPOSAL_LEVELS": True,
        "MODEL.ROI_MASK_HEAD.NAME": "PANetMaskHead",
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "",
    },
    "bifpn-mask_scoring": {
        "MODEL.FPN.BIFPN.ENABLED": True,
        "MODEL.FPN.FUSE_TYPE": "weighted",
        "MODEL.ROI_MASK_HEAD.NAME": "MaskScoringHead",
    },
}


@pytest.mark.parametrize("keys", VARIANTS.values(), ids=list(VARIANTS))
def test_scripted_model_equals_eager(keys):
    # Detectron2's own patches (ResNet's stage list as a ModuleList, ...), as its export does.
    torchscript_patch().patch_nonscriptable_classes()
    cfg = tiny_mask_rcnn_cfg(components="plugin")
    for key, value in keys.items():
        cfg.merge_from_list([key, value])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    fields = plugin_fields(model)
    assert (fields == MASK_RCNN_FIELDS) == (not keys)  # Detectron2's list for the defaults
    scripted = scripting_with_instances(model, fields)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        want = model.inference([{"image": image}], do_postprocess=False)[0]
        got = scripted.inference([{"image": image}], do_postprocess=False)[0]
    assert len(want) > 0
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.pred_masks, want.pred_masks)
    if "mask_scores" in fields:  # MaskScoringHead's own field
        assert torch.equal(got.mask_scores, want.mask_scores)
