"""
A whole Mask R-CNN built with ConvUpsampleMaskHead is Detectron2's Mask R-CNN: a checkpoint of
the model with MaskRCNNConvUpsampleHead loads with no missing/unexpected keys and gives the same
losses and the same detections with the same masks.
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from mask_head_testutils import randomize_, tiny_batch, tiny_mask_rcnn_cfg


@pytest.mark.parametrize("cls_agnostic", [False, True])
def test_checkpoint_loads_and_outputs_match(cls_agnostic):
    torch.manual_seed(0)
    theirs = build_model(
        tiny_mask_rcnn_cfg("MaskRCNNConvUpsampleHead", CLS_AGNOSTIC_MASK=cls_agnostic)
    )
    ours = build_model(tiny_mask_rcnn_cfg("ConvUpsampleMaskHead", CLS_AGNOSTIC_MASK=cls_agnostic))
    randomize_(theirs.roi_heads.mask_head)  # masks far from 0.5 everywhere
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    batch = tiny_batch()
    theirs.train()
    ours.train()
    losses = []
    for model in (theirs, ours):
        torch.manual_seed(1)  # the ROI sampler draws proposals at random
        with EventStorage():
            losses.append(model(batch))
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k]), k

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        out_theirs = theirs([{"image": d["image"]} for d in batch])
        out_ours = ours([{"image": d["image"]} for d in batch])
    for a, b in zip(out_ours, out_theirs):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_masks, b.pred_masks)
        assert a.pred_masks.any() and not a.pred_masks.all()
