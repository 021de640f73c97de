"""The development environment works: CPU ops, Detectron2, and the _C placeholder."""
import importlib
import importlib.util
import os
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
    # v0.6's model_zoo used pkg_resources (gone in setuptools >= 81); the wheel's substitution
    # finds the configs next to model_zoo.py instead.
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert os.path.dirname(model_zoo.__file__) in path
    with open(path) as f:
        assert "Base-RCNN-FPN.yaml" in f.read()
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        model_zoo.get_config_file("COCO-InstanceSegmentation/no_such_config.yaml")


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


def _wheel_builder():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tools", "env", "build_detectron2_wheel.py")
    spec = importlib.util.spec_from_file_location("build_detectron2_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _our_detectron2_wheel():
    import detectron2

    c_module = importlib.import_module("detectron2._C")
    if not getattr(c_module, "IS_PLACEHOLDER", False):
        pytest.skip("Detectron2 here is a source build, not the wheel built from the sdist")
    return os.path.dirname(os.path.dirname(detectron2.__file__))


def test_installed_detectron2_has_every_substitution_and_no_removed_api():
    site_dir = _our_detectron2_wheel()
    builder = _wheel_builder()
    for sub in builder.SUBSTITUTIONS:
        with open(os.path.join(site_dir, sub.path), encoding="utf-8") as f:
            text = f.read()
        assert sub.old not in text, sub.describe()
        assert sub.new in text, sub.describe()
    assert builder.find_removed_api(os.path.join(site_dir, "detectron2")) == []


def test_substitutions_fail_loudly_on_a_different_source(tmp_path):
    builder = _wheel_builder()
    (tmp_path / "a.py").write_text("x = y.astype(np.bool)\nz = np.zeros(3, dtype=np.int)\n")
    subs = [builder.Substitution("a.py", "astype(np.bool)", "astype(bool)", 1, "why"),
            builder.Substitution("a.py", "dtype=np.int)", "dtype=int)", 2, "why")]
    source = (tmp_path / "a.py").read_text()
    with pytest.raises(RuntimeError, match=r"a\.py: expected 2 occurrence\(s\) of 'dtype=np\.int\)', found 1"):
        builder.apply_substitutions(str(tmp_path), subs, log=lambda msg: None)
    assert (tmp_path / "a.py").read_text() == source  # nothing half-applied
    applied = []
    builder.apply_substitutions(str(tmp_path), subs[:1], log=applied.append)
    assert (tmp_path / "a.py").read_text().startswith("x = y.astype(bool)\n")
    assert applied == [f"substituted {subs[0].describe()}"]


def test_removed_api_scan_flags_aliases_only(tmp_path):
    builder = _wheel_builder()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "a = x.astype(np.bool)\n"        # 1: flagged
        "b = np.zeros(2, dtype=np.int)\n"  # 2: flagged
        "c = Image.LINEAR\n"              # 3: flagged
        "import pkg_resources\n"          # 4: flagged
        "d = np.array(m, copy=False)\n"   # 5: flagged
        "e = (np.bool_, np.int64, np.float32, np.str_, Image.BILINEAR, np.asarray(m))\n"
        "f = DatasetFromList(d, copy=False)\n"
    )
    hits = builder.find_removed_api(str(tmp_path))
    assert [(path, line) for path, line, _ in hits] == [(os.path.join("pkg", "m.py"), n)
                                                       for n in range(1, 6)]


def test_substituted_code_paths_run_on_this_numpy_and_pillow():
    """The substituted v0.6 functions that Mask R-CNN training and evaluation reach."""
    import numpy as np
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.data.transforms import ExtentTransform
    from detectron2.layers.mask_ops import paste_mask_in_image_old
    from detectron2.structures import PolygonMasks
    from detectron2.structures.masks import polygons_to_bitmask
    from PIL import Image

    square = [np.array([1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0])]
    bitmask = polygons_to_bitmask(square, 8, 8)
    assert bitmask.dtype == bool and bitmask.sum() == 16 and bitmask[1:5, 1:5].all()
    assert polygons_to_bitmask([], 4, 4).dtype == bool
    keep = PolygonMasks([square, [np.array([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])]]).nonempty()
    assert keep.dtype == torch.bool and keep.tolist() == [True, True]
    # Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR); the default must still resample.
    transform = ExtentTransform(src_rect=(0, 0, 4, 4), output_size=(8, 8))
    assert transform.interp == Image.BILINEAR
    image = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    assert transform.apply_image(image).shape == (8, 8)
    # numpy 2: np.array(PIL image, copy=False) would raise; asarray copies as needed.
    pasted = paste_mask_in_image_old(torch.ones(4, 4), torch.tensor([2.0, 2.0, 6.0, 6.0]), 8, 8,
                                     threshold=0.5)
    assert pasted.dtype == torch.uint8 and pasted.sum().item() > 0 and pasted[0].sum() == 0
    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1}]}]
    print_instances_class_histogram(dicts, ["a", "b"])  # np.int was used for the histogram


def test_mask_target_rasterization_keeps_numpy1_float64_ratio():
    """
    v0.6 rasterizes the mask head's targets with ``mask_size / max(h, 0.1)``, h a float32
    box side: float64 under numpy 1, float32 under numpy 2 (NEP 50), which moves pixels where
    a vertex lands on the target grid. The substituted code must give numpy 1's result.
    """
    import numpy as np
    from detectron2.structures.masks import polygons_to_bitmask, rasterize_polygons_within_box

    _our_detectron2_wheel()

    def reference(polygons, box, mask_size, ratio_type):
        w, h = box[2] - box[0], box[3] - box[1]
        ratio_h = ratio_type(mask_size) / ratio_type(max(h, 0.1))
        ratio_w = ratio_type(mask_size) / ratio_type(max(w, 0.1))
        shifted = []
        for p in polygons:
            p = p.copy()
            p[0::2] = (p[0::2] - box[0]) * np.float64(ratio_w)
            p[1::2] = (p[1::2] - box[1]) * np.float64(ratio_h)
            shifted.append(p)
        return torch.from_numpy(polygons_to_bitmask(shifted, mask_size, mask_size))

    # One of the 9 (of 603) targets of the demo's first 20 iterations where the two differ: a
    # ground-truth box (proposals include them) around a shapes-dataset polygon.
    polygon = [np.array([42.5, 50.5, 32.5, 55.5, 26.5, 63.5, 26.5, 67.5, 25.5, 68.5, 25.5, 76.5,
                         26.5, 77.5, 26.5, 80.5, 28.5, 84.5, 34.5, 90.5, 42.5, 94.5, 54.5, 94.5,
                         61.5, 90.5, 66.5, 84.5, 69.5, 78.5, 69.5, 74.5, 70.5, 73.5, 69.5, 67.5,
                         64.5, 57.5, 62.5, 56.5, 60.5, 53.5, 54.5, 50.5])]
    box = np.array([26.0, 51.0, 71.0, 95.0], dtype=np.float32)
    got = rasterize_polygons_within_box(polygon, box, 28)
    assert torch.equal(got, reference(polygon, box, 28, np.float64))
    assert not torch.equal(got, reference(polygon, box, 28, np.float32))  # the case discriminates
