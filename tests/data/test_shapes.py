"""The synthetic shapes dataset: deterministic, non-trivial, valid COCO, registrable."""
import hashlib
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_util

from fpn_plugin.data.shapes import (
    SHAPE_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_image,
    register_shapes_dataset,
)


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    splits = ensure_shapes_dataset(root, num_train=40, num_val=8, image_size=128, seed=0)
    with open(splits["train"][0]) as f:
        train = json.load(f)
    return root, splits, train


def test_generation_is_deterministic_and_splits_differ(tmp_path, dataset):
    root, splits, train = dataset
    # A smaller dataset with the same seed starts with the same images (per-image streams).
    other = ensure_shapes_dataset(str(tmp_path), num_train=3, num_val=2, image_size=128, seed=0)
    for i in range(3):
        name = f"{i:06d}.jpg"
        with open(os.path.join(splits["train"][1], name), "rb") as a, \
                open(os.path.join(other["train"][1], name), "rb") as b:
            assert a.read() == b.read()
    with open(other["train"][0]) as f:
        small = json.load(f)
    first3 = [a for a in train["annotations"] if a["image_id"] <= 3]
    assert [a["segmentation"] for a in small["annotations"]] == [a["segmentation"] for a in first3]
    # The held-out split is not a copy of the training split.
    with open(os.path.join(other["train"][1], "000000.jpg"), "rb") as a, \
            open(os.path.join(other["val"][1], "000000.jpg"), "rb") as b:
        assert a.read() != b.read()
    # Another seed gives other images.
    third = ensure_shapes_dataset(str(tmp_path / "s1"), num_train=3, num_val=1, image_size=128, seed=1)
    assert _digest(third["train"][1]) != _digest(other["train"][1])


def test_dataset_is_not_trivial(dataset):
    _, _, train = dataset
    anns = train["annotations"]
    per_image = np.bincount([a["image_id"] for a in anns], minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    assert per_image.max() >= 5  # crowded images do occur
    assert {a["category_id"] for a in anns} == set(range(1, len(SHAPE_CLASSES) + 1))
    # Object sizes (longest box side) span more than 4x, so several FPN levels get objects.
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns])
    assert np.percentile(sides, 98) / np.percentile(sides, 2) > 4
    # Occlusion: some pairs of boxes overlap while their (visible) masks stay disjoint.
    occluded = 0
    for img in train["images"]:
        img_anns = [a for a in anns if a["image_id"] == img["id"]]
        rles = [mask_util.merge(mask_util.frPyObjects(a["segmentation"], 128, 128)) for a in img_anns]
        for i in range(len(img_anns)):
            for j in range(i + 1, len(img_anns)):
                box_iou = mask_util.iou([img_anns[i]["bbox"]], [img_anns[j]["bbox"]], [0])[0, 0]
                mask_iou = mask_util.iou([rles[i]], [rles[j]], [0])[0, 0]
                assert mask_iou < 0.02  # visible parts never claim the same pixels
                occluded += box_iou > 0.05
    assert occluded >= 5


def test_annotations_are_valid_coco(dataset):
    _, _, train = dataset
    assert [c["name"] for c in train["categories"]] == list(SHAPE_CLASSES)
    for a in train["annotations"]:
        assert a["iscrowd"] == 0 and a["area"] > 0
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128.5 and y + h <= 128.5
        for poly in a["segmentation"]:
            assert len(poly) >= 6 and len(poly) % 2 == 0
        rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], 128, 128))
        assert mask_util.area(rle) == pytest.approx(a["area"])


def test_visible_masks_match_the_drawn_pixels():
    rng = np.random.default_rng(3)
    image, instances = generate_shapes_image(96, rng)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert 1 <= len(instances) <= 6
    union = np.zeros((96, 96), bool)
    for inst in instances:
        assert inst["mask"].sum() > 0
        assert not (union & inst["mask"]).any()  # visible parts are disjoint
        union |= inst["mask"]


def test_existing_dataset_is_reused_and_changed_parameters_regenerate(tmp_path):
    root = str(tmp_path)
    splits = ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=64)
    stamp = os.path.getmtime(splits["train"][0])
    ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=64)
    assert os.path.getmtime(splits["train"][0]) == stamp
    ensure_shapes_dataset(root, num_train=3, num_val=1, image_size=64)
    with open(splits["train"][0]) as f:
        assert len(json.load(f)["images"]) == 3
    # A deleted image is noticed and the split is rebuilt.
    os.remove(os.path.join(splits["val"][1], "000000.jpg"))
    ensure_shapes_dataset(root, num_train=3, num_val=1, image_size=64)
    assert os.path.isfile(os.path.join(splits["val"][1], "000000.jpg"))


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        ensure_shapes_dataset(str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match="classes"):
        ensure_shapes_dataset(str(tmp_path), classes=("hexagon",))
    with pytest.raises(ValueError, match="num_val"):
        ensure_shapes_dataset(str(tmp_path), num_train=1, num_val=0)


def test_register_loads_through_detectron2(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    prefix = f"shapes_test_{os.getpid()}"
    names = register_shapes_dataset(str(tmp_path), prefix=prefix, num_train=2, num_val=1,
                                    image_size=64)
    assert names == [f"{prefix}_train", f"{prefix}_val"]
    try:
        # Registering again with the same files is a no-op; other files are refused.
        assert register_shapes_dataset(str(tmp_path), prefix=prefix, num_train=2, num_val=1,
                                       image_size=64) == names
        with pytest.raises(ValueError, match="already registered"):
            register_shapes_dataset(str(tmp_path / "other"), prefix=prefix, num_train=2,
                                    num_val=1, image_size=64)
        records = DatasetCatalog.get(names[0])
        assert len(records) == 2
        assert MetadataCatalog.get(names[0]).thing_classes == list(SHAPE_CLASSES)
        anno = records[0]["annotations"][0]
        assert 0 <= anno["category_id"] < len(SHAPE_CLASSES)
        assert isinstance(anno["segmentation"], list)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


@pytest.mark.parametrize("key, value", [("IMAGE_SIZE", 16), ("NUM_TRAIN", 0), ("SEED", -1),
                                        ("NUM_VAL", 2.5)])
def test_bad_shapes_config_names_the_key(tmp_path, key, value):
    from detectron2.config import get_cfg

    from fpn_plugin import add_fpn_plugin_config
    from fpn_plugin.config import add_shapes_config
    from fpn_plugin.data.shapes import register_shapes_from_config

    cfg = add_shapes_config(add_fpn_plugin_config(get_cfg()))
    cfg.DATASETS.SHAPES.ROOT = str(tmp_path)
    cfg.DATASETS.SHAPES[key] = value
    with pytest.raises(ValueError, match=rf"DATASETS.SHAPES.{key} .*{value}"):
        register_shapes_from_config(cfg)
    assert not os.listdir(tmp_path)  # refused before writing anything


def test_visible_parts_have_no_holes():
    """COCO polygons are unioned, so a hole would make a mask claim its occluder's pixels."""
    from fpn_plugin.data.shapes import _has_hole

    for seed in range(40):
        _, instances = generate_shapes_image(128, np.random.default_rng(seed))
        for inst in instances:
            assert not _has_hole(inst["mask"])
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    assert not _has_hole(ring)
    ring[8:12, 8:12] = False
    assert _has_hole(ring)


def test_register_shapes_if_named_only_registers_the_named_unregistered_dataset(tmp_path):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from hostile_testutils import datasets_set_aside

    from fpn_plugin import add_fpn_plugin_config
    from fpn_plugin.config import add_shapes_config
    from fpn_plugin.data.shapes import SHAPES_DATASET_NAMES, register_shapes_if_named

    # Other tests in this process may have registered the real names: set them aside.
    with datasets_set_aside(SHAPES_DATASET_NAMES):
        cfg = add_shapes_config(add_fpn_plugin_config(get_cfg()))
        cfg.DATASETS.SHAPES.ROOT = str(tmp_path / "shapes")
        cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL = 2, 1
        cfg.DATASETS.SHAPES.IMAGE_SIZE = 64
        assert not register_shapes_if_named(cfg, ["coco_2017_val"])
        assert not register_shapes_if_named(get_cfg(), ["shapes_val"])  # no plugin keys
        assert not os.path.exists(cfg.DATASETS.SHAPES.ROOT)
        assert register_shapes_if_named(cfg, ["shapes_val"])
        assert len(DatasetCatalog.get("shapes_val")) == 1
        assert not register_shapes_if_named(cfg, ["shapes_val"])  # already registered
        cfg.DATASETS.SHAPES.IMAGE_SIZE = 8
        assert not register_shapes_if_named(cfg, ["shapes_train"])  # left alone, not checked

