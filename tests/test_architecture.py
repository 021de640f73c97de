"""
The package's structure rules, checked on its source (ast): nothing in ``fpn_plugin/`` rebinds
or deletes an attribute of Detectron2 (module, class or object), no instance attribute is
deleted to steer a base class, and no function is longer than 60 lines (docstring excluded).
"""
import ast
import os
import textwrap

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fpn_plugin")
MAX_FUNCTION_LINES = 60


def _sources():
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, os.path.dirname(PACKAGE)), ast.parse(f.read())


def _detectron2_names(tree: ast.Module):
    """Names bound in the module to something imported from Detectron2 (module, class,
    function, object)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "detectron2":
                    names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "detectron2":
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and \
                node.value.func.attr == "import_module" and node.value.args and \
                isinstance(node.value.args[0], ast.Constant) and \
                str(node.value.args[0].value).startswith("detectron2"):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _base_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


# A process-wide switch of Detectron2's own module that its launch sets the same way in every
# worker (the per-machine process group of detectron2.utils.comm on v0.6); issue 25 allows it.
_ALLOWED = {("fpn_plugin/engine/launch.py", "comm._LOCAL_PROCESS_GROUP")}


def rebinding_of_detectron2(path: str, tree: ast.Module):
    """``(line, text)`` of every assignment to / deletion of an attribute whose base is a name
    from Detectron2, every ``setattr``/``delattr`` on one, and every ``del self.<x>``."""
    d2 = _detectron2_names(tree)
    found = []

    def report(node, target):
        text = ast.unparse(target)
        if (path.replace(os.sep, "/"), text) not in _ALLOWED:
            found.append((node.lineno, text))

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _base_name(target) in d2:
                report(node, target)
            if isinstance(node, ast.Delete) and isinstance(target, ast.Attribute) and \
                    _base_name(target) == "self":
                report(node, target)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("setattr", "delattr") and node.args and \
                _base_name(node.args[0]) in d2:
            report(node, node.args[0])
    return found


def long_functions(tree: ast.Module):
    """``(name, lines)`` of every function longer than the limit, its docstring not counted."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        if not body:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        doc_lines = (node.body[0].end_lineno - node.body[0].lineno + 1) if body is not node.body \
            else 0
        lines = node.end_lineno - first + 1 - doc_lines
        if lines > MAX_FUNCTION_LINES:
            found.append((node.name, lines))
    return found


SOURCES = list(_sources())


def test_the_checks_see_what_they_look_for():
    tree = ast.parse(textwrap.dedent("""
        import detectron2.engine.defaults as d2_defaults
        from detectron2.engine import DefaultTrainer, defaults
        from detectron2 import model_zoo
        import other

        d2_defaults.AMPTrainer = None
        DefaultTrainer.build_model = None
        setattr(defaults, "create_ddp_model", None)
        del model_zoo.get
        other.thing = 1  # not Detectron2's

        class T(DefaultTrainer):
            def __init__(self):
                self.build_model = None  # an instance attribute may be set
                del self.build_model
        """))
    found = [text for _, text in sorted(rebinding_of_detectron2("x.py", tree))]
    assert found == ["d2_defaults.AMPTrainer", "DefaultTrainer.build_model", "defaults",
                     "model_zoo.get", "self.build_model"]
    long = ast.parse("def f():\n    '''doc\n\n    more'''\n" + "    x = 1\n" * 59
                     + "def g():\n" + "    x = 1\n" * 60)
    assert long_functions(long) == [("g", 61)]


@pytest.mark.parametrize("path,tree", SOURCES, ids=[p for p, _ in SOURCES])
def test_nothing_of_detectron2_is_rebound_or_deleted(path, tree):
    assert rebinding_of_detectron2(path, tree) == []


@pytest.mark.parametrize("path,tree", SOURCES, ids=[p for p, _ in SOURCES])
def test_no_function_is_longer_than_60_lines(path, tree):
    assert long_functions(tree) == []


def _plugin_imports(path: str, tree: ast.Module):
    """The ``fpn_plugin`` modules ``path`` imports (relative imports resolved; module-level and
    function-level alike)."""
    package = os.path.dirname(path).replace(os.sep, ".")  # e.g. fpn_plugin.deploy
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fpn_plugin")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "fpn_plugin":
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
    return found


# package -> modules it must never import: export and deploy stand side by side, and nothing
# below the entries imports fpn_plugin.config (which imports every package's keys).
_FORBIDDEN = {
    "fpn_plugin.deploy": ("fpn_plugin.export", "fpn_plugin.train"),
    "fpn_plugin.export": ("fpn_plugin.deploy", "fpn_plugin.train"),
    "fpn_plugin.engine": ("fpn_plugin.config", "fpn_plugin.lazy_config", "fpn_plugin.train",
                          "fpn_plugin.export", "fpn_plugin.deploy"),
    "fpn_plugin.inference": ("fpn_plugin.config", "fpn_plugin.engine", "fpn_plugin.train",
                             "fpn_plugin.export", "fpn_plugin.deploy"),
    "fpn_plugin.utils": ("fpn_plugin.config", "fpn_plugin.engine", "fpn_plugin.inference",
                         "fpn_plugin.export", "fpn_plugin.deploy", "fpn_plugin.checkpoint",
                         "fpn_plugin.data"),
}


def test_the_import_check_resolves_relative_imports():
    tree = ast.parse("from ..export.export import x\nfrom . import y\nimport fpn_plugin.config\n")
    assert _plugin_imports(os.path.join("fpn_plugin", "deploy", "deploy.py"), tree) >= {
        "fpn_plugin.export.export", "fpn_plugin.deploy.y", "fpn_plugin.config"}


@pytest.mark.parametrize("path,tree", SOURCES, ids=[p for p, _ in SOURCES])
def test_imports_point_down_the_layers(path, tree):
    package = os.path.dirname(path).replace(os.sep, ".")
    forbidden = next((v for k, v in _FORBIDDEN.items()
                      if package == k or package.startswith(k + ".")), ())
    wrong = sorted(m for m in _plugin_imports(path, tree)
                   if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert wrong == []
