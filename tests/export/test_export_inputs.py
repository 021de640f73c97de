"""The mask export against hostile and broken inputs: code-running weights, path-traversal ids
and file names, huge or truncated images, broken annotation files, bad numbers, an unusable
output folder, leftovers of a killed run. Each case is refused with a message naming the
culprit (CLI: exit status 2, no traceback), skipped and listed, or made harmless."""
import fcntl
import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from hostile_testutils import code_running_checkpoint, datasets_set_aside

from fpn_plugin.checkpoint import CheckpointError
from fpn_plugin.export import RESULTS_FILE, export_masks
from fpn_plugin.inference import predictor as predictor_module  # builds the model
from fpn_plugin.export.cli import main as cli_main
from fpn_plugin.export.export import ExportOptions


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder)
                  for r, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is built: the input must be refused before that."""
    monkeypatch.setattr(predictor_module, "build_model",
                        lambda cfg: pytest.fail("the model was built"))


@pytest.fixture
def config_file(tmp_path, tiny_cfg):
    path = str(tmp_path / "tiny.yaml")
    with open(path, "w") as f:
        f.write(tiny_cfg.dump())
    return path


@pytest.fixture
def registered(tmp_path):
    """Register a COCO JSON written by the test; unregistered afterwards."""
    names = []

    def _register(name, data, image_dir):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        register_coco_instances(name, {}, str(path), image_dir)
        names.append(name)
        return str(path)

    yield _register
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# -- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_code_running_weights_are_refused_and_never_run(coco_dataset, tiny_cfg, tmp_path,
                                                        config_file, capsys, suffix):
    marker = tmp_path / "code_ran"
    path = code_running_checkpoint(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(CheckpointError, match="other than weights"):
        export_masks(tiny_cfg, path, dataset=coco_dataset[0], output_dir=str(tmp_path / "o"))
    rc = cli_main(["--config-file", config_file, "--weights", path, "--dataset", coco_dataset[0],
                   "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and path in err and "Traceback" not in err
    assert not marker.exists()


def test_weights_with_the_matching_heuristics_query_are_accepted(coco_dataset, tiny_cfg,
                                                                 tiny_weights, tmp_path):
    summary = export_masks(tiny_cfg, tiny_weights + "?matching_heuristics=True",
                           dataset=coco_dataset[0], output_dir=str(tmp_path / "o"),
                           overlays=False, max_images=1)
    assert summary["num_exported"] == 1


# -- names from data ---------------------------------------------------------------------------

def test_path_traversal_ids_and_file_names_stay_inside_the_output(tmp_path, tiny_cfg,
                                                                  tiny_weights, registered):
    """Image ids like 'q/../../../../X' and hostile file names become safe, unique flat names;
    nothing is written outside --output, and every name maps back to its image id."""
    image_dir = tmp_path / "data" / "images"
    image_dir.mkdir(parents=True)
    files = ["same.png", "sub_same.png", "we ird;$(x).png", "..png"]
    for name in files:
        cv2.imwrite(str(image_dir / name), np.full((64, 80, 3), 120, np.uint8))
    (image_dir / "sub").mkdir()
    cv2.imwrite(str(image_dir / "sub" / "same.png"), np.full((64, 80, 3), 60, np.uint8))
    ids = ["q/-x", "q/../../../../X", "../Y", "..", "/etc/Z"]
    names = ["same.png", "sub/same.png", "we ird;$(x).png", "..png", "sub_same.png"]
    data = {"images": [{"id": i, "file_name": f, "height": 64, "width": 80}
                       for i, f in zip(ids, names)],
            "annotations": [], "categories": [{"id": 3, "name": "square"},
                                              {"id": 7, "name": "triangle"}]}
    registered("traversal_ids", data, str(image_dir))
    out = tmp_path / "deep" / "er" / "out"
    before = _files_under(tmp_path)
    summary = export_masks(tiny_cfg, tiny_weights, dataset="traversal_ids", output_dir=str(out),
                           score_threshold=0.0, binary_masks=True)
    assert summary["num_exported"] == 5
    outside = [f for f in _files_under(tmp_path) if f not in before
               and not f.startswith(os.path.relpath(str(out), str(tmp_path)))]
    assert outside == []
    images = json.load(open(out / "images.json"))
    assert sorted(i["id"] for i in images) == sorted(ids)
    stems = [i["name"] for i in images]
    assert len(set(n.lower() for n in stems)) == 5
    for image in images:
        name = image["name"]
        assert "/" not in name and not name.startswith(".") and ".." not in name
        per_image = json.load(open(out / "instance_maps" / f"{name}.json"))
        assert per_image["image_id"] == image["id"] and per_image["name"] == name
        assert (out / "overlays" / f"{name}.jpg").is_file()
    renamed = {r["image_id"]: r["name"] for r in summary["renamed"]}
    # a duplicate stem, odd characters, and "..png"
    assert set(renamed) == {"q/../../../../X", "../Y", ".."}
    assert json.load(open(out / "summary.json"))["renamed"] == summary["renamed"]


# -- output folder ------------------------------------------------------------------------------

def test_output_that_is_a_file_is_refused_before_the_model(coco_dataset, tiny_cfg, tiny_weights,
                                                           tmp_path, config_file, capsys, no_model):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        export_masks(tiny_cfg, tiny_weights, dataset=coco_dataset[0], output_dir=str(target))
    rc = cli_main(["--config-file", config_file, "--weights", tiny_weights, "--dataset",
                   coco_dataset[0], "--output", str(target), "--eval"])
    err = capsys.readouterr().err
    assert rc == 2 and str(target) in err and "--output" in err and "Traceback" not in err
    assert target.read_text() == "not a folder"


def test_a_second_export_into_a_busy_folder_is_refused(coco_dataset, tiny_cfg, tiny_weights,
                                                       tmp_path, no_model):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".export.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another export is writing"):
            export_masks(tiny_cfg, tiny_weights, dataset=coco_dataset[0], output_dir=str(out))


def test_partial_files_of_a_killed_export_are_removed(coco_dataset, tiny_cfg, tiny_weights,
                                                      tmp_path):
    """What a SIGKILL leaves (hidden temporary files, which no handler could remove) is removed
    by the next export into the folder; other hidden files are left alone."""
    out = tmp_path / "out"
    (out / "instance_maps").mkdir(parents=True)
    (out / "instance_masks" / "img_0").mkdir(parents=True)
    leftovers = [out / f".{RESULTS_FILE}.0123456789ab.tmp",
                 out / "instance_maps" / ".img_0.png.a1b2c3d4e5f6.tmp",
                 out / "instance_masks" / "img_0" / ".1.png.ffffffffffff.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    keep = out / ".user_notes.tmp"
    keep.write_text("mine")
    export_masks(tiny_cfg, tiny_weights, dataset=coco_dataset[0], output_dir=str(out),
                 overlays=False, max_images=1)
    assert not any(p.exists() for p in leftovers)
    assert keep.read_text() == "mine"


# -- images -----------------------------------------------------------------------------------

def test_huge_and_truncated_images_are_skipped_unread_and_named(tmp_path, tiny_cfg, tiny_weights,
                                                               dataset_factory, monkeypatch):
    import io

    from PIL import Image

    _, image_dir = dataset_factory(str(tmp_path / "data"), num_images=2)
    buf = io.BytesIO()
    Image.new("RGB", (120, 120)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (12000).to_bytes(2, "big") * 2
    (tmp_path / "data" / "images" / "bomb.jpg").write_bytes(bytes(data))
    png = open(os.path.join(image_dir, "img_0.png"), "rb").read()
    (tmp_path / "data" / "images" / "cut.png").write_bytes(png[: len(png) // 2])
    summary = export_masks(tiny_cfg, tiny_weights, image_dir=image_dir,
                           output_dir=str(tmp_path / "out"), overlays=False)
    skipped = {os.path.basename(s["file_name"]): s["error"] for s in summary["skipped"]}
    assert set(skipped) == {"bomb.jpg", "cut.png"} and summary["num_exported"] == 2
    assert "12000x12000" in skipped["bomb.jpg"] and "INPUT.MAX_IMAGE_PIXELS" in skipped["bomb.jpg"]
    assert "cut.png" in skipped["cut.png"] and "truncated" in skipped["cut.png"]


# -- annotation files ---------------------------------------------------------------------------

def _broken_copy(json_path, change):
    data = json.load(open(json_path))
    change(data)
    return data


def test_register_coco_with_an_unknown_category_is_a_clear_error(coco_dataset, tiny_weights,
                                                                 tmp_path, config_file, capsys,
                                                                 no_model):
    _, json_path, image_dir = coco_dataset
    data = _broken_copy(json_path, lambda d: d["annotations"][1].update(category_id=99))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    try:
        rc = cli_main(["--config-file", config_file, "--weights", tiny_weights, "--dataset",
                       "unknown_category_ds", "--register-coco", str(broken), image_dir,
                       "--output", str(tmp_path / "out")])
    finally:
        DatasetCatalog.remove("unknown_category_ds")
        MetadataCatalog.remove("unknown_category_ds")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "KeyError" not in err
    assert "category_id 99" in err and f"annotation id {data['annotations'][1]['id']}" in err
    assert str(broken) in err


def test_eval_with_a_two_point_polygon_is_refused_before_the_export(coco_dataset, tiny_weights,
                                                                    tmp_path, config_file,
                                                                    capsys, no_model, registered):
    _, json_path, image_dir = coco_dataset
    data = _broken_copy(json_path,
                        lambda d: d["annotations"][0].update(segmentation=[[1.0, 1.0, 9.0, 9.0]]))
    registered("two_point_polygon_ds", data, image_dir)
    rc = cli_main(["--config-file", config_file, "--weights", tiny_weights, "--dataset",
                   "two_point_polygon_ds", "--output", str(tmp_path / "out"), "--eval"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "has 4 coordinates" in err and f"annotation id {data['annotations'][0]['id']}" in err


def test_a_failing_evaluation_still_writes_the_summary(coco_dataset, tiny_cfg, tiny_weights,
                                                       tmp_path):
    class BrokenEvaluator:
        def reset(self):
            pass

        def process(self, inputs, outputs):
            pass

        def evaluate(self):
            raise IndexError("pycocotools fell over")

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="evaluation failed: IndexError: pycocotools fell over"):
        export_masks(tiny_cfg, tiny_weights, dataset=coco_dataset[0], output_dir=str(out),
                     evaluator=BrokenEvaluator(), overlays=False, max_images=2)
    summary = json.load(open(out / "summary.json"))
    assert summary["num_exported"] == 2 and summary["metrics"] is None
    assert "pycocotools fell over" in summary["evaluation_error"]
    assert len(json.load(open(out / RESULTS_FILE))) == summary["num_detections"]


# -- numbers ------------------------------------------------------------------------------------

_BAD_NUMBERS = [("--max-images", "-1"), ("--max-images", "0"), ("--score-threshold", "nan"),
                ("--score-threshold", "1.5"), ("--score-threshold", "-0.1"),
                ("--progress-period", "-1"), ("--progress-period", "inf")]


@pytest.mark.parametrize("option, value", _BAD_NUMBERS,
                         ids=[f"{o.strip('-')}={v}" for o, v in _BAD_NUMBERS])
def test_out_of_range_numbers_are_refused(coco_dataset, tiny_weights, tmp_path, config_file,
                                          capsys, no_model, option, value):
    rc = cli_main(["--config-file", config_file, "--weights", tiny_weights, "--dataset",
                   coco_dataset[0], "--output", str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert rc == 2 and option in err and value in err and "Traceback" not in err


@pytest.mark.parametrize("override", [["INPUT.MAX_IMAGE_PIXELS", "-5"],
                                      ["MODEL.ROI_HEADS.NUM_CLASSES", "two"]],
                         ids=["negative_pixel_limit", "num_classes_not_a_number"])
def test_bad_config_values_are_refused(coco_dataset, tiny_weights, tmp_path, config_file, capsys,
                                       no_model, override):
    rc = cli_main(["--config-file", config_file, "--weights", tiny_weights, "--dataset",
                   coco_dataset[0], "--output", str(tmp_path / "out"), *override])
    err = capsys.readouterr().err
    assert rc == 2 and override[0] in err and "Traceback" not in err


def test_export_options_name_the_argument():
    with pytest.raises(ValueError, match=r"max_images \(--max-images\)"):
        ExportOptions(max_images=True)
    assert ExportOptions(score_threshold=0, max_images=1).max_images == 1


# -- class names of a folder export -------------------------------------------------------------

def test_folder_export_names_classes_of_the_configs_shapes_dataset(tmp_path, cfg_factory,
                                                                  weights_factory,
                                                                  dataset_factory):
    """--images with a config whose DATASETS.TEST is the (unregistered, ungenerated) shapes
    dataset writes its class names and category ids 1-4, not the model's 0-3."""
    cfg = cfg_factory(num_classes=4)
    cfg.DATASETS.TEST = ("shapes_val",)
    weights = weights_factory(cfg, str(tmp_path / "four.pth"))
    _, image_dir = dataset_factory(str(tmp_path / "data"), num_images=2)
    with datasets_set_aside(["shapes_val"]):
        summary = export_masks(cfg, weights, image_dir=image_dir, output_dir=str(tmp_path / "o"),
                               score_threshold=0.0, overlays=False)
    assert summary["category_ids"] == "dataset"
    results = json.load(open(tmp_path / "o" / RESULTS_FILE))
    assert results and {r["category_id"] for r in results} <= {1, 2, 3, 4}
    listing = json.load(open(tmp_path / "o" / "instance_maps" / "img_0.json"))
    assert {i["category"] for i in listing["instances"]} <= {"circle", "rectangle", "triangle",
                                                             "star"}
