"""
fpn_plugin.io.coco: a COCO file is checked before Detectron2 sees it. File-level problems
(no categories, a duplicated category id, nesting too deep to parse) are a CocoSchemaError
naming the file; problems of single images and annotations (no height, negative width, boxes
of negative size, inf or strings, file names outside the image root) are reported per record
and skipped or refused by the DATALOADER.INVALID_RECORDS policy.
"""
import json

import pytest

from fpn_plugin.data.coco_json import scan_coco_json
from fpn_plugin.io import CocoSchemaError, ImagePathError, read_coco_json, resolve_image_path


def _coco(**changes):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
                         "area": 25, "iscrowd": 0,
                         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    for key, value in changes.items():
        data[key] = value
    return data


def _write(tmp_path, data, name="coco.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("categories, expected", [
    ([], "has no categories"),
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "category id 1 appears twice"),
    ([{"id": "1", "name": "a"}], r"categories\[0\] has no integer 'id'"),
    ([{"id": 2}], "has no string 'name'"),
], ids=["no_categories", "duplicate_category_id", "string_id", "no_name"])
def test_category_problems_name_the_file(tmp_path, categories, expected):
    path = _write(tmp_path, _coco(categories=categories))
    with pytest.raises(CocoSchemaError, match=rf"coco\.json.*{expected}"):
        read_coco_json(path)


def test_deeply_nested_json_is_a_clear_error_not_a_recursion_error(tmp_path):
    path = _write(tmp_path, '{"images": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(CocoSchemaError, match="nested too deeply"):
        read_coco_json(path)


@pytest.mark.parametrize("image, expected", [
    ({"id": 1, "file_name": "a.jpg", "width": 32}, "without 'height'"),
    ({"id": 1, "file_name": "a.jpg", "height": 32, "width": -32}, "width -32 is not a positive"),
    ({"id": 1, "file_name": "/etc/passwd", "height": 32, "width": 32}, "outside the image root"),
    ({"id": 1, "file_name": "../elsewhere/a.jpg", "height": 32, "width": 32},
     "outside the image root"),
], ids=["no_height", "negative_width", "absolute_file_name", "dotdot_file_name"])
def test_image_entry_problems_are_reported_with_the_image_id(tmp_path, image, expected):
    scan = scan_coco_json(_write(tmp_path, _coco(images=[image])), str(tmp_path), "d")
    assert scan.bad_image_ids == {1}
    assert any(expected in p.reason for p in scan.problems), [p.reason for p in scan.problems]


@pytest.mark.parametrize("bbox, expected", [
    ([1, 1, -5, 5], "degenerate bbox"),
    ([1, 1, float("inf"), 5], "not a finite number"),
    ([1, 1, "5", 5], "not a finite number"),
    ([1, 1, True, 5], "not a finite number"),
], ids=["negative_width", "inf", "string", "bool"])
def test_bad_ground_truth_boxes_are_reported_with_the_annotation_id(tmp_path, bbox, expected):
    anno = dict(_coco()["annotations"][0], bbox=bbox, id=77)
    text = json.dumps(_coco(annotations=[anno])).replace("Infinity", "Infinity")
    scan = scan_coco_json(_write(tmp_path, text), str(tmp_path), "d")
    bad = [p for p in scan.problems if p.annotation_id == 77]
    assert bad and expected in bad[0].reason


def test_file_names_outside_the_root_pass_when_the_dataset_allows_them(tmp_path):
    assert resolve_image_path("/data/root", "../x/a.jpg", allow_outside=True) == "/data/root/../x/a.jpg"
    with pytest.raises(ImagePathError, match="images_outside_root"):
        resolve_image_path("/data/root", "../x/a.jpg")
    data = _coco(images=[{"id": 1, "file_name": "../a.jpg", "height": 32, "width": 32}])
    scan = scan_coco_json(_write(tmp_path, data), str(tmp_path), "d", allow_outside_root=True)
    assert not scan.problems


def test_a_clean_file_has_no_problems(tmp_path):
    assert not scan_coco_json(_write(tmp_path, _coco()), str(tmp_path), "d").problems
