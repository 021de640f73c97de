"""The set-up itself (tools/env/setup_env.py): host mode, offline wheels, other Pythons.

Every test here reaches the package registry (pip downloads, Detectron2 built from its sdist,
``pip install --dry-run``) or the per-user cache, so the module is marked ``network``: the
default suite skips it; ``pytest --run-network`` (CI's second step) runs it.

Each test runs the real set-up script on a temporary copy of the files it reads, with its own
``FPN_PLUGIN_CACHE`` unless it says otherwise, so this checkout's .venv is never touched.
"""
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_TOOLS = os.path.join(ROOT, "tools", "env")
# What the GPU machines' image lacks (see tools/env/gpu_wheels.py): the simulated host below
# lacks exactly these, and has everything else this checkout's environment has.
NOT_ON_HOST = {"detectron2", "fvcore", "iopath", "pycocotools", "yacs", "termcolor", "omegaconf",
               "hydra-core", "antlr4-python3-runtime", "fpn-plugin"}


pytestmark = pytest.mark.network


def _normalize(name):
    return name.replace("_", "-").replace(".", "-").lower()


def _copy_checkout(dest, with_tests=False):
    """The files the set-up reads (and the package it installs) copied to ``dest``."""
    names = ["setup.py", "README.md", "Makefile", "pytest.ini", "tools", "requirements",
             "fpn_plugin"] + (["tests", "configs"] if with_tests else [])
    os.makedirs(dest)
    for name in names:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dest)
    return dest


def _base_site():
    """site-packages of the base environment this checkout's .venv sees."""
    import torch

    return os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))


def _make_host(tmp_path):
    """
    A Python with torch preinstalled and no Detectron2, like the GPU image: a virtualenv whose
    site folder links to everything of the base environment except NOT_ON_HOST (no download).
    Returns (python, view folder).
    """
    site_dir = _base_site()
    view = tmp_path / "host_view"
    view.mkdir()
    for dist in importlib.metadata.distributions(path=[site_dir]):
        if _normalize(dist.metadata["Name"]) in NOT_ON_HOST:
            continue
        tops = {str(f).split("/")[0] for f in dist.files or []}  # RECORD lists .dist-info too
        for top in tops:
            src = os.path.join(site_dir, top)
            if top not in ("..", "") and os.path.exists(src) and not (view / top).exists():
                os.symlink(src, view / top)
    host = tmp_path / "host"
    subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv",
                    "--without-pip", str(host)], check=True)
    host_py = host / "bin" / "python"
    host_site = subprocess.check_output(
        [host_py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip()
    with open(os.path.join(host_site, "host_view.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({str(view)!r})\n")
    return str(host_py), str(view)


def _freeze(python):
    """name==version of every distribution ``python`` sees, with where each lives."""
    out = subprocess.check_output([python, "-c", (
        "import importlib.metadata as m, json; print(json.dumps(sorted("
        "(d.metadata['Name'].lower(), d.version, str(d.locate_file(''))) for d in m.distributions())))")],
        text=True, cwd="/")  # not the checkout: its fpn_plugin.egg-info would count
    return json.loads(out)


@pytest.mark.parametrize("source", ["carried_wheels", "registry"])
def test_host_mode_installs_only_what_is_missing(source, tmp_path):
    import torch

    if not torch.__file__.startswith(_base_site()):
        pytest.skip("needs the pinned base environment (not a host-mode set-up)")
    host_py, view = _make_host(tmp_path)
    before = _freeze(host_py)
    assert any(name == "torch" for name, _, _ in before)
    assert not any(_normalize(name) in NOT_ON_HOST for name, _, _ in before)

    args = []
    if source == "carried_wheels":
        # The offline path of the GPU check: wheels prepared by gpu_wheels.py, pip --no-index.
        wheels = tmp_path / "wheels"
        py_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        subprocess.run([sys.executable, os.path.join(ENV_TOOLS, "gpu_wheels.py"), "--dest",
                        str(wheels), "--python-version", py_version],
                       check=True, capture_output=True, text=True)
        args = ["--wheels", str(wheels)]
    # else: Detectron2 is built from the sdist, the rest comes from the registry.
    checkout = _copy_checkout(tmp_path / "checkout")
    env = {**os.environ, "FPN_PLUGIN_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([host_py, os.path.join(checkout, "tools", "env", "setup_env.py"), *args],
                         env=env, capture_output=True, text=True)
    logs = glob.glob(str(tmp_path / "cache" / "logs" / "*.log"))
    assert out.returncode == 0, out.stdout + out.stderr + "".join(open(p).read() for p in logs)
    assert "host mode: keeping this interpreter's torch" in out.stdout

    # The host itself is unchanged.
    assert _freeze(host_py) == before
    # The checkout's .venv runs torch/torchvision/numpy from the host, the rest from the new
    # base environment, which holds no second torch.
    venv_py = os.path.join(checkout, ".venv", "bin", "python")
    where = json.loads(subprocess.check_output([venv_py, "-c", (
        "import json, torch, torchvision, numpy, detectron2, fvcore, pycocotools, fpn_plugin; "
        "print(json.dumps({m.__name__: m.__file__ for m in (torch, torchvision, numpy, "
        "detectron2, fvcore, pycocotools, fpn_plugin)}))")], text=True, cwd="/").splitlines()[-1])
    for name in ("torch", "torchvision", "numpy"):
        assert where[name].startswith(view), (name, where[name])
    base = glob.glob(str(tmp_path / "cache" / "envs" / "py*-*[0-9a-f]"))
    assert len(base) == 1
    for name in ("detectron2", "fvcore", "pycocotools"):
        assert where[name].startswith(base[0]), (name, where[name])
    assert where["fpn_plugin"] == os.path.join(checkout, "fpn_plugin", "__init__.py")
    assert not glob.glob(os.path.join(base[0], "lib", "python*", "site-packages", "torch*"))
    with open(os.path.join(base[0], "host-constraints.txt")) as f:
        assert f"torch=={importlib.metadata.version('torch')}" in f.read().split()


def _other_pythons():
    """Interpreters of another minor version (3.11-3.13) than this one found on this machine."""
    found = {}
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for minor in (11, 12, 13):
        if minor == sys.version_info[1]:
            continue
        name = f"python3.{minor}"
        candidates = [shutil.which(name)] + sorted(
            glob.glob(os.path.join(pyenv, "versions", f"3.{minor}.*", "bin", name)))
        for exe in filter(None, candidates):
            ok = subprocess.run([exe, "-c", "import venv, ensurepip"], capture_output=True)
            if ok.returncode == 0:  # pyenv shims of versions not selected fail here
                found[f"3.{minor}"] = exe
                break
    return found


def _full_setup_python(others):
    """The interpreter the full set-up test uses: 3.12 (the GPU machines') if there is one."""
    return others.get("3.12") or next(iter(others.values()), None)


def test_setup_on_a_second_python(tmp_path):
    """
    The full set-up with another interpreter (3.12 preferred: the GPU machines'), reusing the
    per-user cache: seconds when that environment exists, ~2 min and ~6 GB when it does not.
    """
    python = _full_setup_python(_other_pythons())
    if python is None:
        pytest.skip("no other Python 3.11-3.13 interpreter with venv on this machine")
    checkout = _copy_checkout(tmp_path / "checkout", with_tests=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "tools/env/setup_env.py"], cwd=checkout, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    venv_py = os.path.join(checkout, ".venv", "bin", "python")
    version = subprocess.check_output([venv_py, "-c", "import sys; print(sys.version_info[:2])"],
                                      text=True)
    assert version.strip() == str(tuple(int(p) for p in python.rsplit("python", 1)[1].split(".")))
    # The environment tests (numpy 2, the substitutions, model zoo, placeholder) on that Python.
    test = subprocess.run([venv_py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_environment.py"], cwd=checkout, env=env,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert " passed" in test.stdout


def test_lock_resolves_on_the_other_pythons(tmp_path):
    """
    Cheap check (metadata only, ~25 s each) that every pin of the lock has a distribution for
    the interpreters the full set-up test does not use.
    """
    others = _other_pythons()
    full = _full_setup_python(others)
    rest = {minor: exe for minor, exe in others.items() if exe != full}
    if not rest:
        pytest.skip("no third Python 3.11-3.13 interpreter on this machine")
    env = {**os.environ, "FPN_PLUGIN_CACHE": str(tmp_path / "cache")}
    for minor, python in rest.items():
        out = subprocess.run([python, os.path.join(ENV_TOOLS, "setup_env.py"), "--dry-run"],
                             env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"the lock resolves for Python {minor}" in out.stdout
