"""The harder shapes split: its keys, determinism, and that the default dataset is unchanged."""
import json
import os

import numpy as np
import pytest

from fpn_plugin.data import shapes
from fpn_plugin.data.shapes import SHAPES_HARD, ensure_shapes_dataset, generate_shapes_image


def _cfg(tmp_path):
    from detectron2.config import get_cfg

    from fpn_plugin import add_fpn_plugin_config
    from fpn_plugin.config import add_shapes_config

    cfg = add_shapes_config(add_fpn_plugin_config(get_cfg()))
    cfg.DATASETS.SHAPES.ROOT = str(tmp_path / "shapes")
    cfg.DATASETS.SHAPES.HARD.ROOT = str(tmp_path / "shapes_hard")
    cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL = 3, 2
    cfg.DATASETS.SHAPES.IMAGE_SIZE = 64
    return cfg


def test_config_defaults_are_the_generators_defaults_and_the_hard_preset(tmp_path):
    cfg = _cfg(tmp_path)
    s = cfg.DATASETS.SHAPES
    assert tuple(s.OBJECT_SIZE) == shapes.DEFAULT_OBJECT_SIZE == (0.1, 0.5)
    assert s.MAX_INSTANCES == 6 and s.DISTRACTORS == 0
    assert tuple(s.HARD.OBJECT_SIZE) == SHAPES_HARD["object_size"]
    assert s.HARD.MAX_INSTANCES == SHAPES_HARD["max_instances"] > s.MAX_INSTANCES
    assert s.HARD.DISTRACTORS == SHAPES_HARD["distractors"] > 0
    assert s.HARD.OBJECT_SIZE[1] < s.OBJECT_SIZE[1]


def test_explicit_defaults_draw_the_same_pixels_and_annotations():
    for idx in range(6):
        a = generate_shapes_image(96, np.random.default_rng([0, 0, idx]))
        b = generate_shapes_image(96, np.random.default_rng([0, 0, idx]), max_instances=6,
                                  object_size=(0.1, 0.5), distractors=0)
        assert np.array_equal(a[0], b[0])
        assert [(i["category"], i["mask"].tobytes()) for i in a[1]] == \
               [(i["category"], i["mask"].tobytes()) for i in b[1]]


def test_default_files_keep_their_bytes_and_their_parameter_record(tmp_path):
    """The JSON's parameter record gains no new fields at the defaults (files on disk stay
    current, byte for byte); any other value of a new parameter is recorded."""
    default = ensure_shapes_dataset(str(tmp_path / "d"), num_train=2, num_val=1, image_size=64)
    with open(default["train"][0]) as f:
        params = json.load(f)["info"]["fpn_plugin_shapes"]
    assert set(params) == {"generator_version", "split", "num_images", "image_size", "seed",
                           "classes", "max_instances"}
    hard = ensure_shapes_dataset(str(tmp_path / "h"), num_train=2, num_val=1, image_size=64,
                                 **SHAPES_HARD)
    with open(hard["train"][0]) as f:
        params = json.load(f)["info"]["fpn_plugin_shapes"]
    assert params["object_size"] == list(SHAPES_HARD["object_size"])
    assert params["distractors"] == SHAPES_HARD["distractors"]


def test_cache_keys_on_the_new_parameters(tmp_path):
    root = str(tmp_path)
    splits = ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=64, distractors=3)
    with open(splits["train"][0]) as f:
        first = f.read()
    stamp = os.path.getmtime(splits["train"][0])
    ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=64, distractors=3)
    assert os.path.getmtime(splits["train"][0]) == stamp  # same parameters: reused
    for change in ({"distractors": 0}, {"distractors": 3, "object_size": (0.1, 0.3)},
                   {"distractors": 3, "max_instances": 9}):
        ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=64, **change)
        with open(splits["train"][0]) as f:
            params = json.load(f)["info"]["fpn_plugin_shapes"]
        assert params["max_instances"] == change.get("max_instances", 6)
        assert params.get("distractors", 0) == change["distractors"]
    ensure_shapes_dataset(root, num_train=2, num_val=1, image_size=64, distractors=3)
    with open(splits["train"][0]) as f:
        assert f.read() == first  # regenerated to the same bytes: a pure function of the keys


def test_hard_split_is_deterministic_smaller_more_crowded_and_cluttered(monkeypatch):
    drawn = []  # clutter items per call of _draw_distractors
    real = shapes._draw_distractors

    def spy(img, count, object_size, rng):
        drawn.append(count)
        real(img, count, object_size, rng)

    monkeypatch.setattr(shapes, "_draw_distractors", spy)
    sides_default, sides_hard, counts_default, counts_hard, clutter = [], [], [], [], []
    for idx in range(30):
        _, a = generate_shapes_image(128, np.random.default_rng([0, 0, idx]))
        assert drawn == []  # the default split draws no clutter (and no random numbers for it)
        b_img, b = generate_shapes_image(128, np.random.default_rng([0, 0, idx]), **SHAPES_HARD)
        c_img, _ = generate_shapes_image(128, np.random.default_rng([0, 0, idx]), **SHAPES_HARD)
        assert np.array_equal(b_img, c_img)  # deterministic in the generator's stream
        assert len(drawn) == 2 and drawn[0] == drawn[1]
        clutter.append(drawn[0])
        drawn.clear()
        counts_default.append(len(a))
        counts_hard.append(len(b))
        union = np.zeros((128, 128), bool)
        for inst in b:  # visible parts stay disjoint, every annotated object visible
            assert inst["mask"].sum() > 0 and not (union & inst["mask"]).any()
            union |= inst["mask"]
        sides_default += [np.ptp(np.nonzero(i["mask"])[1]) + 1 for i in a]
        sides_hard += [np.ptp(np.nonzero(i["mask"])[1]) + 1 for i in b]
    assert 0 <= min(clutter) and max(clutter) <= SHAPES_HARD["distractors"]
    assert np.mean(clutter) > 2 and max(clutter) > 5
    assert max(counts_hard) > 6 and np.mean(counts_hard) > 1.5 * np.mean(counts_default)
    assert np.median(sides_hard) < 0.75 * np.median(sides_default)


def test_distractors_are_painted_but_never_annotated():
    rng = np.random.default_rng(5)
    img = np.full((64, 64, 3), 100.0, np.float32)
    shapes._draw_distractors(img, 6, (0.2, 0.4), rng)
    assert (img != 100.0).any(axis=2).sum() > 50
    # Only outlines and strokes: no distractor fills a disc like a circle object would.
    img = np.full((64, 64, 3), 100.0, np.float32)
    shapes._draw_distractors(img, 1, (0.8, 0.8), np.random.default_rng(0))
    painted = (img != 100.0).any(axis=2)
    assert painted.sum() < 0.15 * 64 * 64


@pytest.mark.parametrize("key, value", [("OBJECT_SIZE", [0.5, 0.1]), ("OBJECT_SIZE", [0.0, 0.5]),
                                        ("OBJECT_SIZE", [0.1]), ("MAX_INSTANCES", 0),
                                        ("DISTRACTORS", -1), ("DISTRACTORS", 1.5)])
@pytest.mark.parametrize("hard", [False, True])
def test_bad_difficulty_keys_are_named_before_anything_is_written(tmp_path, key, value, hard):
    from fpn_plugin.data.shapes import register_shapes_from_config

    cfg = _cfg(tmp_path)
    node, prefix = ((cfg.DATASETS.SHAPES.HARD, "DATASETS.SHAPES.HARD") if hard
                    else (cfg.DATASETS.SHAPES, "DATASETS.SHAPES"))
    node[key] = value
    names = ["shapes_hard_train"] if hard else ["shapes_train"]
    with pytest.raises(ValueError, match=rf"{prefix}\.{key} "):
        register_shapes_from_config(cfg, names)
    assert not os.listdir(tmp_path)


def test_register_hard_names_from_the_config(tmp_path):
    from detectron2.data import DatasetCatalog
    from hostile_testutils import datasets_set_aside

    from fpn_plugin.data.shapes import (
        SHAPES_DATASET_NAMES,
        register_shapes_from_config,
        register_shapes_if_named,
    )

    cfg = _cfg(tmp_path)
    with datasets_set_aside(SHAPES_DATASET_NAMES):
        # Only what is named is generated: the hard split here, not the default one.
        assert register_shapes_if_named(cfg, ["shapes_hard_val"])
        assert not os.path.exists(cfg.DATASETS.SHAPES.ROOT)
        assert len(DatasetCatalog.get("shapes_hard_train")) == 3
        with open(os.path.join(cfg.DATASETS.SHAPES.HARD.ROOT, "val.json")) as f:
            params = json.load(f)["info"]["fpn_plugin_shapes"]
        assert params["max_instances"] == SHAPES_HARD["max_instances"]
        assert "shapes_train" not in DatasetCatalog.list()
        # Both families from DATASETS.TRAIN / TEST, the default split when nothing is named.
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("shapes_train",), ("shapes_hard_val",)
        assert register_shapes_from_config(cfg) == ["shapes_train", "shapes_val",
                                                    "shapes_hard_train", "shapes_hard_val"]
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("coco_2017_train",), ()
        assert register_shapes_from_config(cfg) == ["shapes_train", "shapes_val"]
