"""fpn_plugin.lazy_config on its own: what it swaps, what it refuses, what it turns into data."""
import logging

import pytest
from fpn_plugin.model_zoo import get_detectron2_config
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling.backbone import ResNet
from omegaconf import DictConfig
from torch import nn

from fpn_plugin.lazy_config import (
    model_zoo_recipe,
    norm_name,
    plain_data,
    pyramid_level_shapes,
    with_plugin_components,
)
from fpn_plugin.mask_head import ConvUpsampleMaskHead, PANetMaskHead
from fpn_plugin.neck import PAFPN, CustomFPN
from fpn_plugin.rpn import PerLevelRPN, PerLevelRPNHead


@pytest.fixture(scope="module")
def d2_model():
    return get_detectron2_config("common/models/mask_rcnn_fpn.py").model


def test_swaps_the_four_components_and_keeps_every_argument(d2_model):
    ours = with_plugin_components(d2_model)
    assert ours.backbone._target_ is CustomFPN
    assert ours.proposal_generator._target_ is PerLevelRPN
    assert ours.proposal_generator.head._target_ is PerLevelRPNHead
    assert ours.roi_heads.mask_head._target_ is ConvUpsampleMaskHead
    for path in ("backbone", "proposal_generator", "proposal_generator.head",
                 "roi_heads.mask_head"):
        node, before = ours, d2_model
        for part in path.split("."):
            node, before = node[part], before[part]
        for key in before:
            if key == "_target_" or f"{path}.{key}" == "proposal_generator.head":
                continue  # swapped (the head: checked on its own)
            if key == "input_shape":  # a ShapeSpec turned into a LazyCall of the same
                assert instantiate(node[key]) == instantiate(before[key]), (path, key)
                assert isinstance(instantiate(node[key]), ShapeSpec)
            else:
                assert node[key] == before[key], (path, key)
    assert (ours.backbone.fuse_type, ours.backbone.upsample_mode) == ("sum", "nearest")
    assert (ours.proposal_generator.head.shared, ours.proposal_generator.head.norm) == (True, "")
    assert ours.roi_heads.mask_head.upsample_mode == "deconv"
    # The input is left as it was, and the interpolations stay references.
    assert d2_model.backbone._target_.__name__ == "FPN"
    assert ours.backbone._get_node("in_features")._value() == "${.bottom_up.out_features}"


def test_is_idempotent_and_keeps_the_plugins_variants(d2_model):
    once = with_plugin_components(d2_model)
    once.backbone._target_ = PAFPN
    once.roi_heads.mask_head._target_ = PANetMaskHead
    twice = with_plugin_components(once)
    assert twice.backbone._target_ is PAFPN
    assert twice.roi_heads.mask_head._target_ is PANetMaskHead


def test_refuses_other_components_naming_the_node(d2_model):
    model = d2_model.copy()
    model.backbone = L(ResNet.make_default_stages)(depth=50)
    with pytest.raises(ValueError, match=r"model\.backbone calls .*make_default_stages.*FPN"):
        with_plugin_components(model)
    model = d2_model.copy()
    del model.proposal_generator
    with pytest.raises(ValueError, match=r"model\.proposal_generator: .*RPN"):
        with_plugin_components(model)
    with pytest.raises(ValueError, match="LazyCall model node"):
        with_plugin_components(DictConfig({"a": 1}))
    with pytest.raises(ValueError, match=r"\.py"):
        model_zoo_recipe("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")


def test_a_model_without_mask_head_is_converted(d2_model):
    model = d2_model.copy()
    model.roi_heads.mask_head = None
    ours = with_plugin_components(model)
    assert ours.roi_heads.mask_head is None and ours.backbone._target_ is CustomFPN


@pytest.mark.parametrize("norm, name", [
    (lambda c: NaiveSyncBatchNorm(c, stats_mode="N"), "naiveSyncBN_N"),
    (lambda c: NaiveSyncBatchNorm(c), "naiveSyncBN"),
    (lambda c: nn.GroupNorm(32, c), "GN"),
    (nn.SyncBatchNorm, "SyncBN"),
    (lambda c: nn.GroupNorm(16, c), None),  # no get_norm name builds 16 groups
    (lambda c: nn.BatchNorm2d(c, eps=1e-3), None),
    (lambda c: 1 / 0, None),
])
def test_norm_name_finds_the_get_norm_name_of_the_same_layer(norm, name):
    assert norm_name(norm) == name


def test_plain_data_turns_objects_into_data_and_warns_when_it_cannot(caplog):
    node = L(ConvUpsampleMaskHead)(
        input_shape=ShapeSpec(channels=8, width=14, height=14),
        conv_norm=lambda c: NaiveSyncBatchNorm(c, stats_mode="N"),
        num_classes=3, conv_dims=[8, 8])
    plain_data(node)
    assert node.conv_norm == "naiveSyncBN_N"
    assert instantiate(node.input_shape) == ShapeSpec(channels=8, width=14, height=14)
    odd = DictConfig({"norm": lambda c: nn.GroupNorm(16, c)}, flags={"allow_objects": True})
    with caplog.at_level(logging.WARNING, logger="fpn_plugin.lazy_config"):
        plain_data(odd)
    assert callable(odd.norm) and "norm: the norm callable" in caplog.text


def test_pyramid_level_shapes():
    assert pyramid_level_shapes(["p2", "p5"], 16) == {
        "p2": ShapeSpec(channels=16, stride=4), "p5": ShapeSpec(channels=16, stride=32)}
    with pytest.raises(ValueError, match="'res2' is not a pyramid level"):
        pyramid_level_shapes(["res2"], 16)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        pyramid_level_shapes(["p2"], 0)
