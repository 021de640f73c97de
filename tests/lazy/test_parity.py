"""
The LazyConfig twins against Detectron2's own LazyConfig models (its model-zoo files, read
without importing ``detectron2.model_zoo``, see tests/test_model_zoo.py):

- full size (R50 and R101 new baselines, the common R50 model), instantiation only: the same
  module tree (names, but for the neck's parameter-free fusion rule; each module of the same
  class, the plugin's four components standing in for Detectron2's; same settings and
  ``extra_repr``), the same state-dict keys and shapes, and the same initial weights from the
  same seed;
- outputs and losses: the R50 new baseline at full width and depth on 96x128 images (both
  sides get the same test-time overrides: score threshold 0 and 20 detections, so the
  comparison covers a full set of boxes and masks; everything else is the recipe): with the
  same weights, identical proposals' consequences: training losses and detections;
- a checkpoint of either model loads strictly into the other.

Why the sizes: building the full R50/R101 models is cheap (a second or two) and is what shows
that the recipes' architecture carries over; a forward at 1024 px would cost minutes on CPU and
test nothing more than 96x128 px does, since every layer, level and head runs at either size.
"""
import pytest
import torch
from fpn_plugin.model_zoo import get_detectron2_config
from detectron2.config import instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.utils.events import EventStorage
from lazy_testutils import ZOO_TWINS, load, settings, tiny_batch
from torch import nn

import fpn_plugin  # noqa: F401  (registers the components)
from fpn_plugin.checkpoint import SafeDetectionCheckpointer
from fpn_plugin.mask_head import ConvUpsampleMaskHead
from fpn_plugin.neck import CustomFPN
from fpn_plugin.rpn import PerLevelRPN, SharedRPNHead

# Detectron2's component class -> the plugin's class the twin builds in its place.
STAND_INS = {FPN: CustomFPN, RPN: PerLevelRPN, StandardRPNHead: SharedRPNHead,
             MaskRCNNConvUpsampleHead: ConvUpsampleMaskHead}
# Submodules only the plugin's components have: parameter- and buffer-free (so the state dicts
# still match key for key; asserted below), e.g. CustomFPN's fusion rule.
PLUGIN_ONLY_MODULES = {"backbone.top_down_fusion"}
FULL_SIZE = ["common/models/mask_rcnn_custom_fpn.py",
             "new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py",
             "new_baselines/mask_rcnn_R_101_custom_FPN_100ep_LSJ.py"]
R50_LSJ = "new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py"


def _twins(rel_path, **test_overrides):
    """(ours, Detectron2's) model, each built with torch seed 0."""
    models = []
    for cfg in (load(rel_path), get_detectron2_config(ZOO_TWINS[rel_path])):
        for key, value in test_overrides.items():
            setattr(cfg.model.roi_heads.box_predictor, key, value)
        torch.manual_seed(0)
        models.append(instantiate(cfg.model))
    return models


@pytest.mark.parametrize("rel_path", FULL_SIZE)
def test_full_model_has_detectron2s_modules_keys_shapes_and_initial_weights(rel_path):
    ours, theirs = _twins(rel_path)
    ours_modules, theirs_modules = list(ours.named_modules()), list(theirs.named_modules())
    for name, module in ours_modules:
        if name in PLUGIN_ONLY_MODULES:
            assert not list(module.parameters()) and not list(module.buffers()), name
    ours_modules = [(n, m) for n, m in ours_modules if n not in PLUGIN_ONLY_MODULES]
    assert [n for n, _ in ours_modules] == [n for n, _ in theirs_modules]
    for (name, a), (_, b) in zip(ours_modules, theirs_modules):
        assert type(a) is STAND_INS.get(type(b), type(b)), name
        assert a.extra_repr() == b.extra_repr(), name
        if type(b) not in STAND_INS:  # the components keep their settings their own way
            assert settings(a) == settings(b), name
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        assert ours_state[key].shape == value.shape, key
        assert torch.equal(ours_state[key], value), key  # same creation and init order
    # The recipe's norms arrived (SyncBN in the LSJ models, NaiveSyncBatchNorm with
    # stats_mode "N" in their heads, FrozenBN in the common model).
    norms = {type(m).__name__ + getattr(m, "_stats_mode", "") for m in ours.modules()
             if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d))}
    assert norms == ({"FrozenBatchNorm2d"} if "common" in rel_path
                     else {"SyncBatchNorm", "NaiveSyncBatchNormN"})


def _calibrate_norms(model, inputs):
    """Running statistics of every BN-like layer set to those of its input on ``inputs`` (a
    randomly initialised deep ResNet's activations otherwise grow out of range in eval)."""
    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    handles = [m.register_forward_pre_hook(set_stats) for m in model.modules()
               if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))]
    with torch.no_grad():
        model.eval()(inputs)
    for h in handles:
        h.remove()


@pytest.fixture(scope="module")
def r50_lsj_pair():
    """The R50 LSJ twin and Detectron2's model, with the same perturbed and calibrated
    weights (non-zero biases everywhere, so a mis-mapped tensor shows in the outputs)."""
    ours, theirs = _twins(R50_LSJ, test_score_thresh=0.0, test_topk_per_image=20)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(2))
    _calibrate_norms(theirs, [{"image": image.float(), "height": 96, "width": 128}])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_same_weights_give_identical_losses_and_detections(r50_lsj_pair):
    ours, theirs = r50_lsj_pair
    batch = tiny_batch(num_images=2, size=96, seed=3)
    results = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(4)  # the same anchor and ROI sampling on both sides
        with EventStorage(0):
            losses = model(batch)
        model.eval()
        with torch.no_grad():
            detections = model([{"image": b["image"], "height": 96, "width": 96}
                                for b in batch])
        results.append((losses, detections))
    (losses, detections), (expected_losses, expected_detections) = results
    assert losses.keys() == expected_losses.keys()
    for key, value in expected_losses.items():
        assert torch.isfinite(value) and value > 0, key
        assert torch.equal(losses[key], value), (key, losses[key], value)
    for got, want in zip(detections, expected_detections):
        got, want = got["instances"], want["instances"]
        assert len(want) == 20  # a full set of detections to compare
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
        assert torch.equal(got.scores, want.scores)
        assert torch.equal(got.pred_classes, want.pred_classes)
        assert torch.equal(got.pred_masks, want.pred_masks)


@pytest.mark.parametrize("direction", ["detectron2_into_ours", "ours_into_detectron2"])
def test_checkpoint_of_one_loads_strictly_into_the_other(r50_lsj_pair, tmp_path, direction):
    ours, theirs = r50_lsj_pair
    source, target_cfg = (theirs, load(R50_LSJ)) if direction == "detectron2_into_ours" else (
        ours, get_detectron2_config(ZOO_TWINS[R50_LSJ]))
    path = tmp_path / "model.pth"
    torch.save({"model": source.state_dict()}, path)
    target = instantiate(target_cfg.model)
    SafeDetectionCheckpointer(target, strict=True).load(str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
