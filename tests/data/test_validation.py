"""Record validation: every kind of bad record is reported with its file and id, then
skipped or refused according to DATALOADER.INVALID_RECORDS."""
import copy
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

from fpn_plugin.data.build import check_invalid_record_policy, get_validated_dataset_dicts
from fpn_plugin.data.shapes import ensure_shapes_dataset
from fpn_plugin.data.validation import check_record_annotations, validate_records

SQUARE = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]


def _record(file_name, image_id, **anno_overrides):
    anno = {"bbox": [10.0, 10.0, 20.0, 20.0], "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0, "segmentation": copy.deepcopy(SQUARE), "iscrowd": 0}
    anno.update(anno_overrides)
    return {"file_name": file_name, "image_id": image_id, "height": 64, "width": 64,
            "annotations": [anno]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_val"))
    return ensure_shapes_dataset(root, num_train=3, num_val=1, image_size=64)


@pytest.mark.parametrize("overrides, reason", [
    ({"bbox": [10.0, 10.0, 0.0, 20.0]}, "degenerate bbox"),
    ({"bbox": [10.0, float("nan"), 5.0, 5.0]}, "non-finite bbox"),
    ({"bbox": [100.0, 100.0, 5.0, 5.0]}, "outside the 64x64 image"),
    ({"segmentation": [[1.0, 1.0, 5.0, 5.0]]}, "degenerate polygon 0: 4 coordinates"),
    ({"segmentation": [[0.0, 0.0, 5.0, 5.0, 10.0, 10.0]]}, "zero area"),
    ({"segmentation": [[0.0, 0.0, 5.0, 5.0, 10.0]]}, "degenerate polygon"),
    ({"category_id": 4}, "category_id 4 outside the dataset's 4 classes"),
    ({"category_id": -1}, "category_id -1"),
    ({"segmentation": {"size": [32, 32], "counts": "x"}}, "RLE size [32, 32] differs"),
])
def test_each_annotation_problem_is_found(overrides, reason):
    problems = check_record_annotations(_record("a.jpg", 1, **overrides), num_classes=4)
    assert len(problems) == 1
    index, message = problems[0]
    assert index == 0 and reason in message


def test_good_annotations_and_missing_masks():
    assert check_record_annotations(_record("a.jpg", 1), num_classes=4) == []
    box_only = _record("a.jpg", 1)
    del box_only["annotations"][0]["segmentation"]
    assert check_record_annotations(box_only, num_classes=4) == []
    problems = check_record_annotations(box_only, num_classes=4, require_segmentation=True)
    assert "no segmentation" in problems[0][1]


def test_image_problems_are_reported_with_file_and_id(tmp_path, shapes):
    good = os.path.join(shapes["train"][1], "000000.jpg")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    records = [
        _record(good, 1),
        _record(str(tmp_path / "missing.jpg"), 2),
        _record(str(garbage), 3),
        dict(_record(good, 4), height=65),  # the record lies about the size
    ]
    valid, invalid = validate_records(records, "toy", num_classes=4)
    assert [r["image_id"] for r in valid] == [1]
    by_id = {p.image_id: p for p in invalid}
    assert "missing" in by_id[2].reason and by_id[2].file_name.endswith("missing.jpg")
    assert "unreadable" in by_id[3].reason
    assert "64x64 but the record says 64x65" in by_id[4].reason
    text = str(by_id[2])
    assert "missing.jpg" in text and "image_id=2" in text and "dataset toy" in text
    # Image checks can be turned off (DATALOADER.CHECK_IMAGES False).
    valid, invalid = validate_records(records, "toy", num_classes=4, check_images=False)
    assert len(valid) == 4 and invalid == []


@pytest.fixture
def registered(shapes):
    """A toy dataset of 3 good shapes records + 2 bad ones, registered by name."""
    json_path, image_dir = shapes["train"]
    name = f"validation_toy_{os.getpid()}"

    def load():
        records = DatasetCatalog.get(f"{name}_src")
        records = copy.deepcopy(records)
        bad_box = copy.deepcopy(records[0])
        bad_box["image_id"] = 100
        bad_box["annotations"][0]["bbox"] = [5.0, 5.0, 0.0, 0.0]
        missing = copy.deepcopy(records[1])
        missing["image_id"] = 101
        missing["file_name"] = os.path.join(image_dir, "nope.jpg")
        return records + [bad_box, missing]

    register_coco_instances(f"{name}_src", {}, json_path, image_dir)
    DatasetCatalog.register(name, load)
    DatasetCatalog.get(f"{name}_src")  # fills thing_classes
    MetadataCatalog.get(name).thing_classes = MetadataCatalog.get(f"{name}_src").thing_classes
    yield name
    for n in (name, f"{name}_src"):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_skip_policy_drops_bad_records_and_reports_them(registered, caplog):
    records, invalid = get_validated_dataset_dicts([registered], policy="skip")
    assert len(records) == 3
    assert sorted(p.image_id for p in invalid) == [100, 101]
    assert any("skipping 2 of 5 image records" in r.getMessage() for r in caplog.records)
    assert any("nope.jpg" in r.getMessage() for r in caplog.records)


def test_error_policy_refuses_with_the_problems_listed(registered):
    with pytest.raises(ValueError) as info:
        get_validated_dataset_dicts([registered], policy="error")
    message = str(info.value)
    assert "DATALOADER.INVALID_RECORDS='error'" in message
    assert "nope.jpg" in message and "image_id=100" in message and "degenerate bbox" in message


def test_unknown_policy_names_the_config_key():
    with pytest.raises(ValueError, match=r"DATALOADER.INVALID_RECORDS .*'drop'"):
        check_invalid_record_policy("drop")


def test_coco_json_with_unknown_category(tmp_path, shapes):
    """load_coco_json raises a bare KeyError; the validated loader reports the annotation."""
    json_path, image_dir = shapes["train"]
    with open(json_path) as f:
        data = json.load(f)
    bad = data["annotations"][0]
    bad["category_id"] = 99
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    name = f"validation_badcat_{os.getpid()}"
    register_coco_instances(name, {}, str(broken), image_dir)
    try:
        with pytest.raises(ValueError) as info:
            get_validated_dataset_dicts([name], policy="error")
        assert f"annotation id {bad['id']}" in str(info.value)
        assert "000000.jpg" in str(info.value)
        records, invalid = get_validated_dataset_dicts([name], policy="skip")
        assert len(records) == len(data["images"]) - 1
        assert bad["image_id"] not in {r["image_id"] for r in records}
        assert [p.image_id for p in invalid] == [bad["image_id"]]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
