"""export_masks end to end through a real (tiny, random) Mask R-CNN, its outputs and failures."""
import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from fpn_plugin.checkpoint import CheckpointError, CheckpointMismatchError
from fpn_plugin.evaluation import build_coco_evaluator
from fpn_plugin.export import RESULTS_FILE, export_masks
from fpn_plugin.export import export as export_module
from fpn_plugin.inference import predictor as predictor_module  # builds the model
from fpn_plugin.export.cli import main as cli_main
from fpn_plugin.io.output import MANIFEST_NAME, OutputFolder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tmp_files(folder):
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".tmp")]


def test_export_records_every_file_it_wrote_in_the_manifest(image_folder, tiny_cfg, tiny_weights,
                                                            tmp_path):
    """The writing boundary's manifest lists what the export wrote (results, image list,
    summary, pictures), so a cleanup can remove exactly those and nothing of the user's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    export_masks(tiny_cfg, tiny_weights, output_dir=str(out), image_dir=image_folder,
                 overlays=False)
    created = OutputFolder(str(out)).created()
    written = {os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs}
    assert RESULTS_FILE in created and "summary.json" in created
    assert any("/" in name for name in created)  # per-image files in their subfolders
    # Not recorded: the user's file, the manifest itself and the export's lock file.
    assert created == written - {"mine.txt", MANIFEST_NAME, ".export.lock"}
    assert "mine.txt" not in created


def test_dataset_export_end_to_end_matches_coco_evaluator(coco_dataset, tiny_cfg, tiny_weights,
                                                          tmp_path, caplog):
    """The real inference path: the exported JSON scored by plain pycocotools equals
    COCOEvaluator fed the very same model outputs during the export."""
    name, gt_json, _ = coco_dataset
    out = str(tmp_path / "out")
    evaluator = build_coco_evaluator(name, str(tmp_path / "eval"))
    with caplog.at_level(logging.INFO, logger="fpn_plugin"):
        summary = export_masks(tiny_cfg, tiny_weights, dataset=name, output_dir=out,
                               score_threshold=0.0, binary_masks=True, evaluator=evaluator)
    assert summary["num_images"] == summary["num_exported"] == 4
    assert summary["skipped"] == [] and summary["category_ids"] == "dataset"
    assert any("ETA" in r.getMessage() for r in caplog.records)

    results = json.load(open(os.path.join(out, RESULTS_FILE)))
    assert len(results) == summary["num_detections"] > 0  # a random model still detects
    assert {r["category_id"] for r in results} <= {3, 7}
    assert {r["image_id"] for r in results} <= {10, 11, 12, 13}

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        for task in ("segm", "bbox"):
            ev = COCOeval(gt, gt.loadRes(os.path.join(out, RESULTS_FILE)), task)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            ours, theirs = ev.stats[0] * 100, summary["metrics"][task]["AP"]
            assert ours == pytest.approx(theirs, abs=1e-9), task

    # Per-image files agree with each other and with the JSON.
    images = json.load(open(os.path.join(out, "images.json")))
    assert [i["id"] for i in images] == [10, 11, 12, 13]
    for image in images:
        listing = json.load(open(os.path.join(out, "instance_maps", image["name"] + ".json")))
        ids = cv2.imread(os.path.join(out, "instance_maps", image["name"] + ".png"),
                         cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint16 and ids.shape == (image["height"], image["width"])
        n = len(listing["instances"])
        assert n == sum(r["image_id"] == image["id"] for r in results)  # threshold 0: all
        assert ids.max() <= n
        scores = [i["score"] for i in listing["instances"]]
        assert scores == sorted(scores, reverse=True)
        covered = np.zeros(ids.shape, dtype=bool)
        for inst in listing["instances"]:
            binary = cv2.imread(os.path.join(out, "instance_masks", image["name"],
                                             f"{inst['id']}.png"), cv2.IMREAD_UNCHANGED)
            # Where the id map shows instance k, k's own mask is set; no earlier mask is.
            assert np.all(binary[ids == inst["id"]] == 255)
            assert not np.any(covered[ids == inst["id"]])
            covered |= binary > 0
        assert np.array_equal(covered, ids > 0)
        overlay = cv2.imread(os.path.join(out, "overlays", image["name"] + ".jpg"))
        assert overlay.shape == (image["height"], image["width"], 3)
    saved = json.load(open(os.path.join(out, "summary.json")))
    assert saved["num_detections"] == summary["num_detections"]
    assert _tmp_files(out) == []


@pytest.fixture
def image_folder(tmp_path, dataset_factory):
    """Three good images and one corrupt one (random bytes named .jpg), plus a non-image."""
    _, image_dir = dataset_factory(str(tmp_path / "data"), num_images=3)
    with open(os.path.join(image_dir, "broken.jpg"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(500))
    with open(os.path.join(image_dir, "notes.txt"), "w") as f:
        f.write("not an image")
    return image_dir


def test_folder_with_a_corrupt_image_skips_it_and_exports_the_rest(image_folder, tiny_cfg,
                                                                  tiny_weights, tmp_path):
    out = str(tmp_path / "out")
    summary = export_masks(tiny_cfg, tiny_weights, image_dir=image_folder, output_dir=out,
                           overlays=False)
    assert summary["num_images"] == 4 and summary["num_exported"] == 3
    assert len(summary["skipped"]) == 1
    assert summary["skipped"][0]["file_name"].endswith("broken.jpg")
    assert summary["skipped"][0]["error"]  # the reason is reported
    images = json.load(open(os.path.join(out, "images.json")))
    assert [i["name"] for i in images] == ["img_0", "img_1", "img_2"]
    assert [i["id"] for i in images] == [2, 3, 4]  # ids follow name order, broken.jpg was 1
    assert sorted(os.listdir(os.path.join(out, "instance_maps"))) == [
        f"img_{i}.{ext}" for i in range(3) for ext in ("json", "png")]
    assert json.load(open(os.path.join(out, "summary.json")))["skipped"] == summary["skipped"]
    assert summary["category_ids"] == "contiguous"


def test_folder_of_only_unreadable_images_is_an_error(tmp_path, tiny_cfg, tiny_weights):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG broken")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        export_masks(tiny_cfg, tiny_weights, image_dir=str(folder), output_dir=out)
    assert not os.path.exists(os.path.join(out, RESULTS_FILE))


def test_missing_weights_fails_before_building_the_model(coco_dataset, tiny_cfg, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(predictor_module, "build_model",
                        lambda cfg: pytest.fail("model built despite missing weights"))
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not found") as info:
        export_masks(tiny_cfg, missing, dataset=coco_dataset[0], output_dir=str(tmp_path))
    assert missing in str(info.value)


def test_corrupt_weights(coco_dataset, tiny_cfg, tmp_path):
    path = str(tmp_path / "corrupt.pth")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(1).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        export_masks(tiny_cfg, path, dataset=coco_dataset[0], output_dir=str(tmp_path / "o"))
    assert path in str(info.value)


def test_mismatched_weights_name_the_first_keys(coco_dataset, cfg_factory, weights_factory,
                                                tmp_path):
    # Weights of a 3-class model into the 2-class model of the same architecture.
    path = weights_factory(cfg_factory(num_classes=3), str(tmp_path / "three_classes.pth"))
    with pytest.raises(CheckpointMismatchError) as info:
        export_masks(cfg_factory(num_classes=2), path, dataset=coco_dataset[0],
                     output_dir=str(tmp_path / "o"))
    msg = str(info.value)
    assert path in msg and "roi_heads.box_predictor.cls_score.weight" in msg
    assert not os.path.exists(str(tmp_path / "o" / RESULTS_FILE))


def test_unregistered_dataset(tiny_cfg, tiny_weights, tmp_path):
    with pytest.raises(ValueError, match="'no_such_dataset_xyz' is not registered"):
        export_masks(tiny_cfg, tiny_weights, dataset="no_such_dataset_xyz",
                     output_dir=str(tmp_path))


def test_bad_arguments(coco_dataset, tiny_cfg, tiny_weights, tmp_path, cfg_factory):
    with pytest.raises(ValueError, match="exactly one"):
        export_masks(tiny_cfg, tiny_weights, output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        export_masks(tiny_cfg, tiny_weights, image_dir=str(tmp_path / "nope"),
                     output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES is 5"):
        export_masks(cfg_factory(num_classes=5), tiny_weights, dataset=coco_dataset[0],
                     output_dir=str(tmp_path))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_export_keeps_the_previous_complete_json(coco_dataset, tiny_cfg,
                                                             tiny_weights, tmp_path,
                                                             monkeypatch, exc):
    name = coco_dataset[0]
    out = str(tmp_path / "out")
    export_masks(tiny_cfg, tiny_weights, dataset=name, output_dir=out, overlays=False,
                 max_images=1)
    results_path = os.path.join(out, RESULTS_FILE)
    previous = open(results_path).read()
    assert json.loads(previous)  # a complete, non-empty first run

    real = export_module.ImageOutputWriter.write
    calls = []

    def crash_on_third_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exc("simulated crash mid-export")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module.ImageOutputWriter, "write", crash_on_third_image)
    with pytest.raises(exc):
        export_masks(tiny_cfg, tiny_weights, dataset=name, output_dir=out, overlays=False)
    assert open(results_path).read() == previous  # untouched, still valid JSON
    assert _tmp_files(out) == []  # no partial file left behind

    fresh = str(tmp_path / "fresh")
    calls.clear()
    with pytest.raises(exc):
        export_masks(tiny_cfg, tiny_weights, dataset=name, output_dir=fresh, overlays=False)
    assert not os.path.exists(os.path.join(fresh, RESULTS_FILE))
    assert not os.path.exists(os.path.join(fresh, "images.json"))
    assert _tmp_files(fresh) == []


def test_cli_folder_export_and_clear_errors(image_folder, tiny_cfg, tiny_weights, tmp_path,
                                            capsys):
    config = str(tmp_path / "tiny.yaml")
    with open(config, "w") as f:
        f.write(tiny_cfg.dump())
    out = str(tmp_path / "cli_out")
    rc = cli_main(["--config-file", config, "--weights", tiny_weights, "--images", image_folder,
                   "--output", out, "--no-overlays", "--progress-period", "0",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.2"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert printed["num_exported"] == 3 and printed["num_images"] == 4
    assert os.path.isfile(os.path.join(out, RESULTS_FILE))
    results = json.load(open(os.path.join(out, RESULTS_FILE)))
    assert all(r["score"] >= 0.2 for r in results)  # the override reached the config

    rc = cli_main(["--config-file", config, "--weights", tiny_weights, "--dataset",
                   "not_registered_abc", "--output", out])
    err = capsys.readouterr().err
    assert rc == 2 and "not_registered_abc" in err and "Traceback" not in err
    rc = cli_main(["--config-file", config, "--weights", str(tmp_path / "none.pth"),
                   "--images", image_folder, "--output", out])
    assert rc == 2 and "none.pth" in capsys.readouterr().err
    rc = cli_main(["--config-file", config, "--weights", tiny_weights, "--images",
                   image_folder, "--output", out, "MODEL.NO_SUCH_KEY", "1"])
    assert rc == 2 and "NO_SUCH_KEY" in capsys.readouterr().err


def test_cli_registers_coco_json_and_evaluates(coco_dataset, tiny_cfg, tiny_weights, tmp_path,
                                               capsys):
    _, gt_json, image_dir = coco_dataset
    config = str(tmp_path / "tiny.yaml")
    with open(config, "w") as f:
        f.write(tiny_cfg.dump())
    out = str(tmp_path / "out")
    rc = cli_main(["--config-file", config, "--weights", tiny_weights, "--dataset",
                   "cli_registered_ds", "--register-coco", gt_json, image_dir, "--output", out,
                   "--eval", "--no-overlays", "--max-images", "2"])
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.remove("cli_registered_ds")
    MetadataCatalog.remove("cli_registered_ds")
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[1])
    assert set(metrics) == {"bbox", "segm"}
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["num_images"] == 2
    assert all(v is None or math.isfinite(v) for v in summary["metrics"]["segm"].values())


def test_python_dash_m_entry_point(tmp_path):
    """`python -m fpn_plugin.export` runs and reports a bad input without a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "fpn_plugin.export", "--config-file", str(tmp_path / "no.yaml"),
         "--images", str(tmp_path), "--output", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "config file not found" in proc.stderr and "Traceback" not in proc.stderr
    # Start-up noise of torch/Detectron2 (FutureWarnings about their own calls) stays out.
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr


def test_folder_export_takes_classes_from_the_test_dataset(dataset_factory, tiny_cfg,
                                                          tiny_weights, tmp_path):
    """A folder export names classes and writes dataset category ids of cfg.DATASETS.TEST[0],
    even when that COCO dataset was registered but never loaded (lazy metadata)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_path, image_dir = dataset_factory(str(tmp_path / "data"), num_images=2)
    register_coco_instances("export_lazy_meta_ds", {}, json_path, image_dir)
    try:
        assert not MetadataCatalog.get("export_lazy_meta_ds").get("thing_classes")
        cfg = tiny_cfg.clone()
        cfg.DATASETS.TEST = ("export_lazy_meta_ds",)
        out = str(tmp_path / "out")
        summary = export_masks(cfg, tiny_weights, image_dir=image_dir, output_dir=out,
                               score_threshold=0.0, overlays=False)
    finally:
        DatasetCatalog.remove("export_lazy_meta_ds")
        MetadataCatalog.remove("export_lazy_meta_ds")
    assert summary["category_ids"] == "dataset"
    results = json.load(open(os.path.join(out, RESULTS_FILE)))
    assert results and {r["category_id"] for r in results} <= {3, 7}
    listing = json.load(open(os.path.join(out, "instance_maps", "img_0.json")))
    assert {i["category"] for i in listing["instances"]} <= {"square", "triangle"}


def test_export_applies_the_fast_inference_config(coco_dataset, tiny_cfg, tiny_weights, tmp_path):
    """MODEL.FAST_INFERENCE reaches the exported model: its convolutions run in bf16 on NHWC
    tensors (those of the fp32 export in fp32, NCHW), and the results change."""
    name, _, _ = coco_dataset
    cfg = tiny_cfg.clone()
    if "FAST_INFERENCE" not in cfg.MODEL:
        from fpn_plugin import add_fpn_plugin_config

        add_fpn_plugin_config(cfg)

    def export(precision, channels_last, out):
        cfg.MODEL.FAST_INFERENCE.PRECISION = precision
        cfg.MODEL.FAST_INFERENCE.CHANNELS_LAST = channels_last
        convs = []

        def record(module, args, output):
            if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                convs.append((output.dtype, output.is_contiguous(memory_format=torch.channels_last)
                              and not output.is_contiguous()))

        hook = nn.modules.module.register_module_forward_hook(record)
        try:
            summary = export_masks(cfg, tiny_weights, dataset=name, output_dir=str(out),
                                   score_threshold=0.0, overlays=False)
        finally:
            hook.remove()
        assert summary["num_exported"] == 4
        return convs, json.load(open(os.path.join(str(out), RESULTS_FILE)))

    convs32, results32 = export("fp32", False, tmp_path / "fp32")
    convs, results = export("bf16", True, tmp_path / "bf16")
    assert convs32 and all(dtype == torch.float32 and not nhwc for dtype, nhwc in convs32)
    # Every convolution of the exported model ran in bf16 and in NHWC.
    assert len(convs) == len(convs32)
    assert all(dtype == torch.bfloat16 and nhwc for dtype, nhwc in convs)
    # The written results are finite and changed by bf16 (how close they stay to fp32's is
    # measured on fixed boxes in tests/inference/test_fast_path.py; here detections may be
    # selected differently, so only the count is compared).
    assert results and all(math.isfinite(r["score"]) for r in results)
    assert len(results) == len(results32)
    assert sorted(r["score"] for r in results) != sorted(r["score"] for r in results32)


def test_overlays_without_class_names_leave_the_metadata_catalog_alone(image_folder, tiny_cfg,
                                                                      tiny_weights, tmp_path):
    """No dataset names the classes: overlays are drawn with the model's class ids, and
    Detectron2's Visualizer is never given ``None`` (it would register "__nonexist__")."""
    from detectron2.data import MetadataCatalog

    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    out = str(tmp_path / "out")
    before = set(MetadataCatalog.keys())
    summary = export_masks(cfg, tiny_weights, output_dir=out, image_dir=image_folder,
                           overlays=True, score_threshold=0.0)
    assert set(MetadataCatalog.keys()) == before
    overlays = os.listdir(os.path.join(out, "overlays"))
    assert summary["num_exported"] >= 1 and len(overlays) == summary["num_exported"]
