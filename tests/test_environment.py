"""The development environment works: CPU ops, Detectron2, and the _C placeholder."""
import importlib
import subprocess
import sys

import pytest
import torch
import torchvision.ops as ops

from fpn_plugin.utils.env import has_compiled_ops


def test_torchvision_ops_run_on_cpu():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]
    feat = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = ops.roi_align(feat, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=1,
                        spatial_scale=1.0, sampling_ratio=2, aligned=True)
    # The mean of a linear ramp over the whole map, sampled at 2x2 bilinear points.
    assert out.item() == pytest.approx(feat.mean().item(), abs=1e-5)


def test_detectron2_modeling_imports_and_builds_mask_rcnn():
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    assert detectron2.__version__
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_model_zoo_configs_are_packaged():
    # model_zoo imports pkg_resources: this fails if setuptools>=81 slipped in.
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    with open(path) as f:
        assert "Base-RCNN-FPN.yaml" in f.read()


def test_compiled_op_placeholder_raises_clear_error():
    c_module = importlib.import_module("detectron2._C")
    if not getattr(c_module, "IS_PLACEHOLDER", False):
        pytest.skip("Detectron2 here has its compiled extension")
    assert not has_compiled_ops()
    from detectron2.layers import ROIAlignRotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(RuntimeError) as info:
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    message = str(info.value)
    assert "box_iou_rotated" in message
    assert "build Detectron2 from source" in message
    pooler = ROIAlignRotated(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2)
    with pytest.raises(RuntimeError, match="roi_align_rotated_forward"):
        pooler(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, 0.0]]))
    # Informational queries used by collect_env must not raise.
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


def test_placeholder_dunder_lookups_stay_attribute_errors():
    c_module = importlib.import_module("detectron2._C")
    if not getattr(c_module, "IS_PLACEHOLDER", False):
        pytest.skip("Detectron2 here has its compiled extension")
    assert not hasattr(c_module, "__path__")
    assert not hasattr(c_module, "__wrapped__")
    # Non-dunder names resolve to ops that raise only when called.
    from detectron2._C import COCOevalAccumulate

    with pytest.raises(RuntimeError, match="COCOevalAccumulate"):
        COCOevalAccumulate({}, {})


def test_detectron2_is_a_pip_managed_package():
    out = subprocess.run([sys.executable, "-m", "pip", "show", "detectron2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Name: detectron2" in out.stdout
