"""
Fuzzing the COCO reading boundary: generated COCO files (good records mutated field by field
into wrong types, non-finite or negative numbers, duplicates, missing keys, bad paths, deep
nesting) either scan cleanly, with every problem reported per record, or fail with a
CocoSchemaError naming the file; and whatever the scan passes, Detectron2's load_coco_json
loads without an exception.
"""
import json
import os

from detectron2.data.datasets import load_coco_json
from fuzz_testutils import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from fpn_plugin.data.coco_json import scan_coco_json, without_images
from fpn_plugin.io import CocoSchemaError

ODD = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3),
                st.sampled_from([float("nan"), float("inf"), -1.5, 0.0, 2.5]),
                st.lists(st.integers(-2, 40), max_size=9), st.just({}))
NUMBER = st.one_of(st.integers(1, 30), st.floats(0.5, 30))


@st.composite
def coco_files(draw):
    num_images = draw(st.integers(0, 3))
    images = [{"id": i + 1, "file_name": f"im{i}.jpg", "height": 32, "width": 32}
              for i in range(num_images)]
    categories = [{"id": c + 1, "name": f"c{c}"} for c in range(draw(st.integers(0, 3)))]
    annotations = []
    for k in range(draw(st.integers(0, 4))):
        x, y, w, h = draw(NUMBER), draw(NUMBER), draw(NUMBER), draw(NUMBER)
        annotations.append({
            "id": k + 1, "image_id": draw(st.integers(0, num_images + 1)),
            "category_id": draw(st.integers(0, 4)), "bbox": [x, y, w, h], "iscrowd": 0,
            "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        })
    data = {"images": images, "annotations": annotations, "categories": categories}
    # Mutate a few fields of a few entries into odd values, or drop them.
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(["images", "annotations", "categories"]))
        if not data[section]:
            continue
        entry = data[section][draw(st.integers(0, len(data[section]) - 1))]
        key = draw(st.sampled_from(sorted(entry) + ["file_name"]))
        if draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = draw(st.one_of(ODD, st.sampled_from(["/etc/x.jpg", "../up.jpg"])))
    if draw(st.integers(0, 9)) == 0:
        data["info"] = json.loads("[" * 200 + "]" * 200)  # deep, yet parseable
    if draw(st.integers(0, 9)) == 0:
        return "[" * 50000 + "]" * 50000  # too deep for Python's parser
    return data


@FUZZ
@given(coco_files())
def test_scan_reports_or_refuses_and_detectron2_loads_what_passes(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("coco")
    path = os.path.join(folder, "f.json")
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    try:
        scan = scan_coco_json(path, str(folder), "fuzz")
    except CocoSchemaError as e:
        assert "f.json" in str(e)
        return
    for p in scan.problems:
        assert p.dataset == "fuzz" and p.reason
    kept = without_images(scan.data, scan.bad_image_ids)
    clean = os.path.join(folder, "clean.json")
    with open(clean, "w") as f:
        json.dump(kept, f)
    load_coco_json(clean, str(folder), None)  # never raises on what the scan let through
