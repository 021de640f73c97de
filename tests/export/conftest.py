"""Fixtures of the export tests: a tiny COCO dataset on disk and a tiny Mask R-CNN."""
import json
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from model_testutils import tiny_mask_rcnn_cfg

@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny models gain nothing from threads, and the shared 2-core machines make them contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Non-contiguous dataset ids, so a missing id mapping would show in the results.
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]
IMAGE_HW = (64, 80)


def _shape_polygon(rng, kind, h, w):
    size = int(rng.integers(14, 42))
    x0 = int(rng.integers(0, w - size))
    y0 = int(rng.integers(0, h - size))
    if kind == 3:
        pts = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    else:
        pts = [(x0, y0 + size), (x0 + size // 2, y0), (x0 + size, y0 + size)]
    return [float(c) for p in pts for c in p]


def make_coco_dataset(root, num_images=4, seed=0):
    """Write images + a COCO JSON with polygon masks; return (json_path, image_dir)."""
    rng = np.random.default_rng(seed)
    h, w = IMAGE_HW
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for j in range(2 + i % 2):
            cat = CATEGORIES[(i + j) % 2]["id"]
            poly = _shape_polygon(rng, cat, h, w)
            color = (200, 80, 40) if cat == 3 else (40, 200, 220)
            cv2.fillPoly(image, [np.array(poly, dtype=np.int32).reshape(-1, 2)], color)
            xs, ys = poly[0::2], poly[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({
                "id": len(annotations) + 1, "image_id": 10 + i, "category_id": cat,
                "segmentation": [poly], "bbox": bbox, "area": bbox[2] * bbox[3] * 0.75,
                "iscrowd": 0,
            })
        file_name = f"img_{i}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        images.append({"id": 10 + i, "file_name": file_name, "height": h, "width": w})
    json_path = os.path.join(root, "annotations.json")
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return json_path, image_dir


@pytest.fixture
def coco_dataset(tmp_path):
    """A registered tiny COCO dataset: (name, json_path, image_dir); unregistered afterwards."""
    json_path, image_dir = make_coco_dataset(str(tmp_path / "data"))
    name = f"export_test_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, json_path, image_dir)
    DatasetCatalog.get(name)  # fills thing_classes / thing_dataset_id_to_contiguous_id
    yield name, json_path, image_dir
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.fixture
def tiny_cfg():
    return tiny_mask_rcnn_cfg()


def save_random_weights(cfg, path, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return path


@pytest.fixture
def tiny_weights(tmp_path, tiny_cfg):
    """A .pth checkpoint of a randomly initialised tiny model (a real file on the load path)."""
    return save_random_weights(tiny_cfg, str(tmp_path / "tiny_model.pth"))


# Test modules cannot import conftest under --import-mode=importlib: hand out the builders.
@pytest.fixture
def cfg_factory():
    return tiny_mask_rcnn_cfg


@pytest.fixture
def weights_factory():
    return save_random_weights


@pytest.fixture
def dataset_factory():
    return make_coco_dataset


@pytest.fixture(autouse=True)
def _cli_logging_undone(restore_loggers):
    """The CLIs run in-process here configure fpn_plugin's and Detectron2's loggers
    (``log_to_stderr``); later tests get them back as they were."""
    yield
