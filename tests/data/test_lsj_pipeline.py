"""
Every LazyConfig recipe under configs/new_baselines runs its real training data pipeline
(Detectron2's DatasetMapper with ResizeScale, FixedSizeCrop and RandomFlip, polygon masks,
recomputed boxes) on polygon annotations: FixedSizeCrop clips polygons with shapely, which
must be installed, and crops that cut objects must still give one box and one mask each.
"""
import glob
import os

import cv2
import numpy as np
import pytest
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BoxMode, PolygonMasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "new_baselines", "*.py")))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lsj") / "img.jpg")
    cv2.imwrite(path, np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    polygons = [[[10, 10, 600, 20, 620, 470, 15, 460]],  # spans the image: always cut
                [[300, 200, 360, 200, 330, 260]]]
    annotations = [{"bbox": [10, 10, 610, 460], "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 0, "segmentation": polygons[0], "iscrowd": 0},
                   {"bbox": [300, 200, 60, 60], "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 1, "segmentation": polygons[1], "iscrowd": 0}]
    return {"file_name": path, "height": 480, "width": 640, "image_id": 1,
            "annotations": annotations}


def test_shapely_is_installed():
    import shapely  # noqa: F401  (FixedSizeCrop's polygon clipping)


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.basename(r) for r in RECIPES])
def test_recipe_data_pipeline_crops_polygons(recipe, record):
    cfg = LazyConfig.load(recipe)
    augmentations = cfg.dataloader.train.mapper.augmentations
    assert any("FixedSizeCrop" in str(a.get("_target_")) for a in augmentations)
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert mapper.use_instance_mask and mapper.instance_mask_format == "polygon"
    crop = tuple(next(a for a in augmentations if "FixedSizeCrop" in str(a["_target_"])).crop_size)
    for seed in range(3):
        np.random.seed(seed)
        out = mapper(dict(record, annotations=[dict(a) for a in record["annotations"]]))
        assert tuple(out["image"].shape[1:]) == crop
        instances = out["instances"]
        assert isinstance(instances.gt_masks, PolygonMasks)
        assert len(instances) == len(instances.gt_masks) >= 1
        boxes = instances.gt_boxes.tensor
        assert (boxes[:, 2:] >= boxes[:, :2]).all() and (boxes >= 0).all()
