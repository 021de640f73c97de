"""
Fuzzing the writing boundary: generated folder trees (the user's files, subfolders, symlinks
to folders and files outside) and sequences of writes with generated names, then clean().
Each write lands inside the folder or is refused with OutputFolderError; nothing outside the
folder changes; clean() and require_own() never delete a file the plugin did not write.
"""
import os

from fuzz_testutils import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from fpn_plugin.io import OutputFolder, OutputFolderError

PARTS = st.sampled_from(["a", "b", "overlays", "..", ".", "", "x.png", "link", "flink", "~",
                         "/tmp", "c.json"])
NAMES = st.lists(PARTS, min_size=1, max_size=4).map("/".join)


def _snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = f.read()
    return out


@FUZZ
@given(tree=st.lists(st.tuples(st.sampled_from(["file", "dir", "link", "flink"]),
                               st.sampled_from(["a", "b", "overlays", "a/x.png", "b/c.json",
                                                "link", "flink"])), max_size=6),
       writes=st.lists(NAMES, max_size=6), clean=st.booleans())
def test_writes_stay_inside_and_foreign_files_survive(tmp_path_factory, tree, writes, clean):
    base = tmp_path_factory.mktemp("out")
    outside = base / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_text("outside")
    (outside / "sub" / "x.png").write_text("outside png")
    root = base / "root"
    root.mkdir()
    for kind, rel in tree:
        path = root / rel
        if os.path.lexists(path) or not path.parent.is_dir() or path.parent.is_symlink():
            continue
        if kind == "file":
            path.write_text("user")
        elif kind == "dir":
            path.mkdir()
        elif kind == "link":
            os.symlink(outside / "sub", path)
        else:
            os.symlink(outside / "secret.txt", path)
    before_outside = _snapshot(outside)
    before_root = _snapshot(root)
    folder = OutputFolder(str(root))
    written = set()
    for name in writes:
        try:
            path = folder.write_text(name, "plugin")
        except OutputFolderError:
            continue
        real = os.path.realpath(path)
        assert os.path.commonpath([real, str(root)]) == str(root), (name, real)
        written.add(real)
    assert _snapshot(outside) == before_outside
    if clean:
        folder.clean()
    after = _snapshot(root)
    for path, data in before_root.items():
        # A user's file survives unless the plugin was asked to write that very name (atomic
        # replacement of its own output), which the manifest then records as the plugin's.
        if os.path.realpath(path) not in written:
            assert after.get(path) == data, path
    assert _snapshot(outside) == before_outside
