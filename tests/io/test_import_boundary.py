"""
No entry reads a config, dataset, image or checkpoint, or writes or deletes a file, except
through the boundaries (fpn_plugin.io, fpn_plugin.config.load_config, the engine's loaders):
an AST scan of every entry (projects/*/*.py, fpn_plugin/*/cli.py, fpn_plugin/*/__main__.py)
for the calls that read or write files directly.
"""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRIES = sorted(
    glob.glob(os.path.join(ROOT, "projects", "*", "*.py"))
    + glob.glob(os.path.join(ROOT, "fpn_plugin", "*", "cli.py"))
    + glob.glob(os.path.join(ROOT, "fpn_plugin", "*", "__main__.py"))
    + [os.path.join(ROOT, "fpn_plugin", "train.py")])

# module attribute calls that read untrusted files or write/delete files directly
FORBIDDEN = {
    ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "safe_load"),
    ("json", "load"), ("torch", "load"), ("torch", "save"), ("pickle", "load"),
    ("pickle", "loads"), ("cv2", "imread"), ("cv2", "imwrite"), ("shutil", "rmtree"),
    ("shutil", "copy"), ("shutil", "move"), ("os", "remove"), ("os", "unlink"),
    ("os", "rmdir"), ("os", "replace"), ("os", "rename"), ("Image", "open"),
    ("LazyConfig", "load"), ("LazyConfig", "save"),
}
FORBIDDEN_METHODS = {"merge_from_file", "write_text", "write_bytes", "unlink", "rmtree"}
WRITE_MODES = ("w", "a", "x", "+")


def _violations(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if (owner, func.attr) in FORBIDDEN or func.attr in FORBIDDEN_METHODS:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {owner}.{func.attr}")
        elif isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            text = mode.value if isinstance(mode, ast.Constant) else ("?" if mode else "r")
            if not isinstance(text, str) or any(c in text for c in WRITE_MODES) or text == "?":
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} open(mode={text!r})")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import yaml, shutil\nyaml.unsafe_load(open('c'))\nshutil.rmtree('d')\n"
                   "open('x', 'w')\ncfg.merge_from_file('f')\n")
    assert len(_violations(str(bad))) == 4


@pytest.mark.parametrize("entry", ENTRIES, ids=[os.path.relpath(e, ROOT) for e in ENTRIES])
def test_entries_read_and_write_only_through_the_boundaries(entry):
    assert _violations(entry) == []
