"""COCO files read as written: what Detectron2's loader would drop silently or fail on is
reported with file, image id and annotation id, skipped or refused by the policy, and listed."""
import json
import os
import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from fpn_plugin.data.build import (
    InvalidRecordsError,
    get_validated_dataset_dicts,
    load_dataset_records,
    write_invalid_records,
)
from fpn_plugin.data.coco_json import scan_coco_json

SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]


def _image(i):
    return {"id": i, "file_name": f"img_{i}.png", "height": 48, "width": 48}


def _anno(anno_id, on_image, **overrides):
    anno = {"id": anno_id, "image_id": on_image, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0],
            "segmentation": [list(SQUARE)], "area": 400.0, "iscrowd": 0}
    anno.update(overrides)
    return anno


def _write(root, images, annotations, categories=({"id": 1, "name": "square"},)):
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    for im in images:
        cv2.imwrite(os.path.join(image_dir, im["file_name"]),
                    np.full((im["height"], im["width"], 3), 90, np.uint8))
    path = os.path.join(root, f"{uuid.uuid4().hex[:6]}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": list(categories)}, f)
    return path, image_dir


@pytest.fixture
def register(tmp_path):
    names = []

    def _register(images, annotations, **kw):
        path, image_dir = _write(str(tmp_path / uuid.uuid4().hex[:6]), images, annotations, **kw)
        name = f"cocojson_{uuid.uuid4().hex[:8]}"
        register_coco_instances(name, {}, path, image_dir)
        names.append(name)
        return name, path

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("bad, reason", [
    (dict(segmentation=[[1.0, 1.0, 5.0, 5.0]]), "has 4 coordinates"),
    (dict(segmentation=[list(SQUARE), [3.0, 3.0]]), "polygon 1 has 2 coordinates"),
    (dict(segmentation=[[1.0, 1.0, 5.0, 5.0, 9.0]]), "has 5 coordinates"),
    (dict(category_id=99), "category_id 99"),
    (dict(image_id=777), "refers to image_id 777"),
    (dict(ignore=1), "'ignore' flag"),
    (dict(bbox=[]), "is not [x, y, width, height]"),
    (dict(segmentation="abc"), "neither polygons nor RLE"),
], ids=["polygon_2_points", "second_polygon_1_point", "polygon_odd_length", "unknown_category",
        "missing_image", "ignore_flag", "empty_bbox", "segmentation_string"])
def test_each_problem_of_the_file_is_reported_with_ids(tmp_path, bad, reason):
    path, image_dir = _write(str(tmp_path), [_image(1), _image(2)],
                             [_anno(10, 1), _anno(11, 2, **bad)])
    scan = scan_coco_json(path, image_dir, "toy")
    assert len(scan.problems) == 1
    problem = scan.problems[0]
    assert reason in problem.reason and path in problem.reason
    assert problem.annotation_id == 11
    if "image_id" not in bad:
        assert problem.image_id == 2 and problem.file_name.endswith("img_2.png")
        assert problem.annotation == 0 and "annotation id 11" in str(problem)


def test_duplicate_ids_are_reported(tmp_path):
    path, image_dir = _write(str(tmp_path), [_image(1), _image(2), _image(2)],
                             [_anno(10, 1), _anno(10, 2)])
    reasons = [p.reason for p in scan_coco_json(path, image_dir, "toy").problems]
    assert any("image id 2 appears twice" in r for r in reasons)
    assert any("annotation id 10 is not unique" in r for r in reasons)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a list"),
    ('{"images": 3}', "'images' is not a list"),
], ids=["not_json", "a_list", "images_not_a_list"])
def test_an_unreadable_file_is_named(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        scan_coco_json(str(path), str(tmp_path), "toy")
    assert str(path) in str(info.value)


def test_dropped_polygon_is_skipped_and_listed_in_training(register, tmp_path, caplog):
    """The record Detectron2 would have kept without its polygon is skipped whole, reported
    with file, image id and annotation id, and written to invalid_records.json."""
    name, path = register([_image(1), _image(2), _image(3)],
                          [_anno(10, 1), _anno(11, 2, segmentation=[[1.0, 1.0, 5.0, 5.0]]),
                           _anno(12, 3)])
    records, problems = get_validated_dataset_dicts([name], policy="skip",
                                                    require_segmentation=True)
    assert sorted(r["image_id"] for r in records) == [1, 3]
    assert [(p.image_id, p.annotation_id) for p in problems] == [(2, 11)]
    assert any("img_2.png" in r.getMessage() and "annotation id 11" in r.getMessage()
               for r in caplog.records)
    report = tmp_path / "invalid_records.json"
    write_invalid_records(problems, str(report))
    listed = json.loads(report.read_text())
    assert listed[0]["annotation_id"] == 11 and listed[0]["image_id"] == 2
    assert listed[0]["file_name"].endswith("img_2.png") and listed[0]["kind"] == "invalid"


def test_images_left_without_annotations_are_listed(register):
    name, _ = register([_image(1), _image(2), _image(3)],
                       [_anno(10, 1), _anno(11, 3, iscrowd=1)])
    records, problems = get_validated_dataset_dicts([name], policy="error")  # not a problem
    assert [r["image_id"] for r in records] == [1]
    assert sorted(p.image_id for p in problems) == [2, 3]
    assert {p.kind for p in problems} == {"no_annotations"}
    assert all("FILTER_EMPTY_ANNOTATIONS" in p.reason for p in problems)


def test_error_policy_lists_every_problem_of_every_dataset(register):
    first, _ = register([_image(1), _image(2)],
                        [_anno(10, 1, category_id=99), _anno(11, 2, segmentation=[[0.0, 0.0]])])
    second, _ = register([_image(1), _image(2)], [_anno(20, 1), _anno(21, 2, bbox=[0, 0, 0, 5])])
    with pytest.raises(InvalidRecordsError) as info:
        get_validated_dataset_dicts([first, second], policy="error")
    message = str(info.value)
    assert "3 problem(s)" in message
    for text in ("category_id 99", "annotation id 11", "degenerate bbox", "annotation id 21"):
        assert text in message, text
    assert len(info.value.problems) == 3


def test_record_problems_name_the_annotation_id(register):
    """Problems found after loading (here a box outside the image) carry the file's id too."""
    name, _ = register([_image(1), _image(2)],
                       [_anno(40, 2), _anno(41, 1), _anno(42, 1, bbox=[100.0, 100.0, 5.0, 5.0])])
    _, problems = get_validated_dataset_dicts([name], policy="skip", filter_empty=False)
    assert [(p.annotation, p.annotation_id) for p in problems] == [(1, 42)]
    assert "outside" in problems[0].reason


def test_unknown_category_no_longer_stops_loading(register):
    name, _ = register([_image(1), _image(2)], [_anno(10, 1), _anno(11, 2, category_id=99)])
    with pytest.raises(KeyError):
        DatasetCatalog.get(name)  # Detectron2's own loader
    loaded = load_dataset_records(name)
    assert [r["image_id"] for r in loaded.records] == [1]
    assert [p.annotation_id for p in loaded.problems] == [11]
