"""
fpn_plugin.io.output.OutputFolder, the writing boundary, and its users: nothing is written
outside the folder or through a symlinked subfolder; an OUTPUT_DIR that is a file is refused;
clean() and demo --fresh delete only files the plugin created; the shapes generator never
overwrites a user's dataset (and takes over one it generated before manifests existed).
"""
import importlib.util
import json
import os

import pytest

from fpn_plugin.data.shapes import ensure_shapes_dataset
from fpn_plugin.io import MANIFEST_NAME, OutputFolder, OutputFolderError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_demo():
    spec = importlib.util.spec_from_file_location(
        "demo_entry", os.path.join(ROOT, "projects", "fpn_mask_rcnn", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_through_a_symlinked_subfolder_are_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.png").write_bytes(b"precious")
    out = OutputFolder(str(tmp_path / "out"))
    os.symlink(victim, tmp_path / "out" / "overlays")
    with pytest.raises(OutputFolderError, match="overlays is a symlink"):
        out.write_bytes("overlays/a.png", b"overwritten")
    assert (victim / "a.png").read_bytes() == b"precious"
    assert os.listdir(victim) == ["a.png"]


@pytest.mark.parametrize("name", ["../x.json", "/tmp/x.json", "a/../../x.json", "~/x.json", ""])
def test_names_outside_the_folder_are_refused(tmp_path, name):
    out = OutputFolder(str(tmp_path / "out"))
    with pytest.raises(OutputFolderError):
        out.write_text(name, "x")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(OutputFolderError, match="is an existing file"):
        OutputFolder(str(path))
    assert path.read_text() == "mine"


def test_manifest_clean_removes_only_what_the_plugin_wrote(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    out.write_json("sub/a.json", {"a": 1})
    out.write_text("b.txt", "b")
    (tmp_path / "out" / "sub" / "user.txt").write_text("user")
    assert out.foreign_files() == ["sub/user.txt"]
    with pytest.raises(OutputFolderError, match="sub/user.txt"):
        out.require_own("--fresh")
    again = OutputFolder(str(tmp_path / "out"))  # the manifest survives the object
    assert again.created() == {"sub/a.json", "b.txt"}
    assert sorted(again.clean()) == ["b.txt", "sub/a.json"]
    assert (tmp_path / "out" / "sub" / "user.txt").read_text() == "user"
    assert sorted(os.listdir(tmp_path / "out")) == [MANIFEST_NAME, "sub"]


def test_adopt_new_records_files_a_library_wrote(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    (tmp_path / "out" / "user.txt").write_text("u")
    before = out.files()
    (tmp_path / "out" / "log.txt").write_text("log")
    assert out.adopt_new(before) == ["log.txt"]
    assert out.foreign_files() == ["user.txt"]


def test_shapes_generator_never_overwrites_a_users_dataset(tmp_path):
    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    (root / "train.json").write_text(json.dumps({"images": [], "annotations": []}))
    (root / "train" / "000000.jpg").write_bytes(b"my photo")
    with pytest.raises(OutputFolderError, match="did not create"):
        ensure_shapes_dataset(str(root), num_train=2, num_val=1, image_size=64)
    assert (root / "train" / "000000.jpg").read_bytes() == b"my photo"
    assert json.loads((root / "train.json").read_text()) == {"images": [], "annotations": []}


def test_shapes_generated_before_manifests_are_taken_over(tmp_path):
    root = tmp_path / "old"
    splits = ensure_shapes_dataset(str(root), num_train=2, num_val=1, image_size=64)
    os.remove(root / MANIFEST_NAME)  # as written by an earlier version
    ensure_shapes_dataset(str(root), num_train=3, num_val=1, image_size=64)  # regenerates
    with open(splits["train"][0]) as f:
        assert len(json.load(f)["images"]) == 3


def test_demo_fresh_deletes_only_its_own_files(tmp_path):
    demo = _load_demo()
    out = tmp_path / "out"
    folder = OutputFolder(str(out))
    folder.write_text("metrics.json", "{}")
    (out / "config.yaml").write_text("a user's file named like an output")
    (out / "data").mkdir()
    (out / "data" / "keep.txt").write_text("k")
    with pytest.raises(OutputFolderError, match="--fresh"):
        demo._remove_previous_run(OutputFolder(str(out)))
    assert (out / "metrics.json").exists() and (out / "data" / "keep.txt").exists()
    os.remove(out / "config.yaml")
    os.remove(out / "data" / "keep.txt")
    demo._remove_previous_run(OutputFolder(str(out)))
    assert not (out / "metrics.json").exists()


def test_demo_with_an_output_dir_that_is_a_file_exits_2(tmp_path, capsys):
    demo = _load_demo()
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(SystemExit) as e:
        demo.main(["--output-dir", str(path)])
    assert e.value.code == 2 and path.read_text() == "mine"
    assert "is an existing file" in capsys.readouterr().err


def test_export_refuses_a_symlinked_overlays_folder_before_the_model(tmp_path):
    from fpn_plugin.export.export import ExportOptions, ImageOutputWriter

    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / "overlays")
    with pytest.raises(OutputFolderError, match="overlays is a symlink"):
        ImageOutputWriter(str(tmp_path / "out"), ExportOptions(), "BGR")
    assert os.listdir(victim) == []
