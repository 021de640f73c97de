"""
``python -m fpn_plugin.deploy``: writes the model in each format and method, loads it back,
checks it against eager on the sample images (plus an untraced size) and reports; bad input
ends with exit status 2 and one line naming the culprit, before the model is built where it
can be; a deployed model that differs from eager ends with exit status 1.
"""
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from deploy_testutils import small_cfg, spread_predictions_, write_images
from hostile_testutils import code_running_checkpoint

from fpn_plugin.io.output import MANIFEST_NAME, OutputFolder
from fpn_plugin.deploy import cli
from fpn_plugin.inference import predictor as predictor_module  # builds the model

DEMO = "configs/Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml"


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder)
                  for r, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small demo config file, its weights (.pth) and a folder of two sample images."""
    root = tmp_path_factory.mktemp("deploy_inputs")
    cfg = small_cfg(DEMO)
    config_file = str(root / "config.yaml")
    with open(config_file, "w") as f:
        f.write(cfg.dump())
    torch.manual_seed(0)
    model = spread_predictions_(build_model(cfg))
    weights = str(root / "model.pth")
    torch.save({"model": model.state_dict(), "iteration": 0}, weights)
    images = str(root / "images")
    write_images(images)
    return {"config": config_file, "weights": weights, "images": images, "root": root}


def _run(inputs, output, *extra):
    argv = ["--config-file", inputs["config"], "--weights", inputs["weights"],
            "--output", str(output), "--images", inputs["images"], *extra]
    return cli.main(argv)


@pytest.mark.parametrize("fmt, method", [("torchscript", "trace"), ("torchscript", "script"),
                                         ("onnx", "trace")])
def test_deploys_checks_and_reports(inputs, tmp_path, capsys, fmt, method):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    assert _run(inputs, out, "--format", fmt, "--method", method) == 0
    model_file = "model.ts" if fmt == "torchscript" else "model.onnx"
    assert _files_under(str(out)) == sorted([model_file, "summary.json", MANIFEST_NAME])
    # The writing boundary records what the deploy wrote (and only that) as the plugin's own.
    assert OutputFolder(str(out)).created() == {model_file, "summary.json"}
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert line["passed"] is summary["passed"] is True
    assert line["model_file"] == summary["model_file"] == str(out / model_file)
    assert summary["format"] == fmt and summary["method"] == method
    assert summary["interface"]["outputs"] == ["pred_boxes", "pred_classes", "pred_masks",
                                               "scores", "image_size"]
    images = summary["images"]
    assert len(images) == 3  # two sample images and the crop of the first (untraced size)
    assert images[2]["file_name"] is None and images[2]["input_size"] != images[0]["input_size"]
    assert all(r["paired"] == r["eager_detections"] > 0 and r["unpaired"] == 0 for r in images)
    if fmt == "torchscript":  # same kernels: bit for bit
        assert summary["largest"]["bitwise_equal"] is True
        assert summary["largest"]["max_box_diff"] == 0.0
    else:
        assert summary["largest"]["max_box_diff"] <= summary["tolerances"]["boxes"]
        assert summary["versions"]["onnxruntime"]
    if method == "script":
        assert summary["scripted_fields"] == sorted(["proposal_boxes", "objectness_logits",
                                                     "pred_boxes", "scores", "pred_classes",
                                                     "pred_masks"])


def test_difference_beyond_the_tolerance_exits_1(inputs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    # ONNX Runtime's kernels differ from torch's in the last bits: a zero tolerance fails.
    assert _run(inputs, out, "--format", "onnx", "--box-tolerance", "0") == 1
    err = capsys.readouterr().err
    assert "differs from eager beyond the tolerances" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False and summary["largest"]["max_box_diff"] > 0


def test_sample_images_from_a_registered_dataset(inputs, tmp_path, capsys):
    # Ids and paths that would climb out of a folder if they became file names: the command
    # writes only its two fixed names, so they stay data (in summary.json).
    name = "deploy_test_samples"
    images = inputs["images"]
    records = [{"image_id": "../../escape", "height": 60, "width": 90,
                "file_name": os.path.join(images, "..", "images", "img_0.png")},
               {"image_id": 7, "height": 72, "width": 82,
                "file_name": os.path.join(images, "img_1.png")}]
    DatasetCatalog.register(name, lambda: records)
    out = tmp_path / "nested" / "out"
    before = set(os.listdir(tmp_path))
    try:
        argv = ["--config-file", inputs["config"], "--weights", inputs["weights"], "--format",
                "torchscript", "--output", str(out), "--dataset", name, "--max-images", "1"]
        assert cli.main(argv) == 0
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert _files_under(str(tmp_path / "nested")) == [f"out/{MANIFEST_NAME}", "out/model.ts",
                                                       "out/summary.json"]
    assert set(os.listdir(tmp_path)) == before | {"nested"}
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["images"]][0] == "../../escape"
    assert len(summary["images"]) == 2  # --max-images 1, plus the crop


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is built: the input must be refused before that."""
    monkeypatch.setattr(predictor_module, "build_model", lambda cfg: pytest.fail("model built"))


BAD_OPTIONS = {
    "format": (["--format", "caffe2"], "--format must be one of"),
    "method": (["--format", "torchscript", "--method", "compile"], "--method must be one of"),
    "onnx_script": (["--format", "onnx", "--method", "script"], "use --method trace"),
    "max_images": (["--format", "torchscript", "--max-images", "0"], "--max-images"),
    "opset": (["--format", "onnx", "--opset", "11"], "opset >= 16"),
    "tolerance": (["--format", "onnx", "--mask-tolerance", "-1"], "tolerance masks"),
}


@pytest.mark.parametrize("extra, message", BAD_OPTIONS.values(), ids=list(BAD_OPTIONS))
def test_bad_options_exit_2_before_the_model_is_built(inputs, tmp_path, capsys, no_model,
                                                      extra, message):
    assert _run(inputs, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_files_exit_2_naming_them(inputs, tmp_path, capsys, no_model):
    base = ["--format", "torchscript", "--output", str(tmp_path / "out")]
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["--config-file", missing, "--weights", inputs["weights"], *base]) == 2
    assert missing in capsys.readouterr().err
    absent = str(tmp_path / "absent.pth")
    assert cli.main(["--config-file", inputs["config"], "--weights", absent, *base]) == 2
    assert absent in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = ["--config-file", inputs["config"], "--weights", inputs["weights"], "--format",
            "torchscript", "--output", str(a_file), "--images", inputs["images"]]
    assert cli.main(argv) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "x"
    empty = tmp_path / "no_images"
    empty.mkdir()
    argv[argv.index(str(a_file))] = str(tmp_path / "out")
    argv[argv.index(inputs["images"])] = str(empty)
    assert cli.main(argv) == 2
    assert "no image files" in capsys.readouterr().err
    # A key the config does not have.
    assert cli.main(argv[:-2] + ["--images", inputs["images"], "MODEL.NO_SUCH_KEY", "1"]) == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err
    # No --images/--dataset: DATASETS.TEST[0], here COCO's, whose files are not on this machine.
    assert cli.main(argv[:-2] + ["DATASETS.TEST", "('coco_2017_val',)"]) == 2
    err = capsys.readouterr().err
    assert "DATASETS.TEST[0] 'coco_2017_val'" in err and "pass --images DIR" in err


def test_weights_are_loaded_safely_and_strictly(inputs, tmp_path, capsys):
    marker = tmp_path / "ran"
    hostile = code_running_checkpoint(str(tmp_path / "hostile.pth"), str(marker))
    out = tmp_path / "out"
    argv = ["--config-file", inputs["config"], "--format", "torchscript", "--output", str(out),
            "--images", inputs["images"]]
    assert cli.main(argv + ["--weights", hostile]) == 2
    assert not marker.exists()
    assert "hostile.pth" in capsys.readouterr().err
    # Weights of another model (wider neck) do not load silently.
    other = small_cfg(DEMO, **{"MODEL.FPN.OUT_CHANNELS": 64})
    path = str(tmp_path / "other.pth")
    torch.save({"model": build_model(other).state_dict()}, path)
    assert cli.main(argv + ["--weights", path]) == 2
    assert "other.pth" in capsys.readouterr().err
    assert not os.path.exists(out / "model.ts")


def test_fast_path_config_is_traced_and_refused_for_scripting(inputs, tmp_path, capsys):
    fast = ["MODEL.FAST_INFERENCE.PRECISION", "bf16", "MODEL.FAST_INFERENCE.CHANNELS_LAST",
            "True"]
    out = tmp_path / "out"
    assert _run(inputs, out, "--format", "torchscript", "--max-images", "1", *fast) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fast_inference"] == {"precision": "bf16", "channels_last": True}
    assert summary["largest"]["bitwise_equal"] is True  # against the eager fast path
    capsys.readouterr()
    assert _run(inputs, tmp_path / "o2", "--format", "torchscript", "--method", "script",
                *fast) == 2
    assert "--method trace" in capsys.readouterr().err


def test_fast_path_config_is_refused_for_onnx(inputs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")  # without it the command refuses for that reason first
    fast = ["MODEL.FAST_INFERENCE.PRECISION", "bf16"]
    assert _run(inputs, tmp_path / "out", "--format", "onnx", *fast) == 2
    assert "no bf16 Conv" in capsys.readouterr().err


def test_writes_only_its_two_files_and_cleans_stale_temporaries(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".model.ts.0123456789ab.tmp"  # what a killed run leaves
    stale.write_bytes(b"partial")
    before = set(os.listdir(tmp_path))
    assert _run(inputs, out, "--format", "torchscript", "--max-images", "1") == 0
    # Its two files, and the writing boundary's manifest that records them as the plugin's.
    assert _files_under(str(out)) == [MANIFEST_NAME, "model.ts", "summary.json"]
    assert set(os.listdir(tmp_path)) == before
    assert set(os.listdir(inputs["images"])) == {"img_0.png", "img_1.png"}
