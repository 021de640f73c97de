#!/usr/bin/env python
"""Create (or reuse) fpn_plugin's development environment; run by ``make setup``.

Two layers, so that fresh clones (CI's among them) do not download ~5 GB each time:

1. A *base* virtualenv in a per-user cache, keyed by a hash of everything that decides its
   contents (the pinned requirements, these scripts, the Python version). It holds torch,
   torchvision, Detectron2 and the other dependencies. It is built once per key and marked
   complete only after a final check passes; an unmarked one is deleted and rebuilt.
2. ``.venv`` in the checkout: a thin virtualenv that sees the base environment's packages
   (through a ``.pth`` file) and holds the editable install of this checkout, so two clones
   never import each other's code. ``.venv/bin/python`` is the interpreter to use.

If the interpreter running this script already imports Detectron2 (for example a GPU user's
source build), the base environment is created with ``--system-site-packages`` and nothing
that interpreter already has is installed or upgraded; only missing helpers are added.

Environment variables: ``FPN_PLUGIN_CACHE`` (cache folder, default
``$XDG_CACHE_HOME/fpn_plugin`` or ``~/.cache/fpn_plugin``).
"""
import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_TOOLS = os.path.join(ROOT, "tools", "env")
LOCK_FILE = os.path.join(ROOT, "requirements", "cpu-lock.txt")
VENV = os.path.join(ROOT, ".venv")
COMPLETE_MARK = ".fpn_plugin_env_complete"
SDIST_SPEC = "pb1-detectron2==0.6"
# What a Detectron2 that came with the interpreter may lack; installed only if missing.
SYSTEM_MODE_EXTRAS = {
    "pycocotools": "pycocotools",
    "fvcore": "fvcore",
    "cv2": "opencv-python-headless",
    "psutil": "psutil",
    "pytest": "pytest",
    "xdist": "pytest-xdist",
    "pytest_timeout": "pytest-timeout",
    "matplotlib": "matplotlib",
}

CHECK_SCRIPT = r"""
import importlib, sys, torch, torchvision, torchvision.ops as ops
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
assert ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0], "torchvision nms"
out = ops.roi_align(torch.ones(1, 1, 8, 8), [boxes[:1]], output_size=2)
assert out.shape == (1, 1, 2, 2), "torchvision roi_align"
import detectron2, detectron2.modeling, detectron2.layers, detectron2.model_zoo, pycocotools, fvcore, cv2
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "detectron2", detectron2.__version__, "at", detectron2.__file__)
"""


class SetupError(Exception):
    def __init__(self, step, why, todo):
        super().__init__(f"{step}: {why}")
        self.step, self.why, self.todo = step, why, todo


def log(msg):
    print(f"[setup] {msg}", flush=True)


def cache_root():
    if os.environ.get("FPN_PLUGIN_CACHE"):
        return os.path.abspath(os.environ["FPN_PLUGIN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fpn_plugin")


def existing_detectron2():
    """Location of a Detectron2 importable by this interpreter, or None."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def env_key(system_d2):
    digest = hashlib.sha256()
    for path in (LOCK_FILE, __file__, os.path.join(ENV_TOOLS, "build_detectron2_wheel.py"),
                 os.path.join(ENV_TOOLS, "detectron2_c_placeholder.py")):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(sys.version.encode())
    digest.update(platform.machine().encode())
    digest.update(sys.executable.encode())
    digest.update(repr(system_d2).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_step(step, cmd, logfile, todo, **kwargs):
    log(f"{step} ...")
    start = time.time()
    with open(logfile, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if proc.returncode != 0:
        with open(logfile) as f:
            tail = "".join(f.readlines()[-15:])
        raise SetupError(step, f"`{' '.join(cmd)}` exited with {proc.returncode}; last lines "
                         f"of {logfile}:\n{tail}", todo)
    log(f"{step}: done in {time.time() - start:.0f} s")


def build_base_env(base, system_d2, wheel_cache, logfile):
    net_todo = ("check that PyPI is reachable (pip config list shows the index) and that the "
                "disk holding the cache has ~8 GB free, then run `make setup` again")
    venv_cmd = [sys.executable, "-m", "venv", base]
    if system_d2:
        venv_cmd.insert(3, "--system-site-packages")
    run_step("creating the base virtualenv", venv_cmd, logfile,
             "check that this Python has the venv module (Debian: apt-get install python3-venv)")
    py = os.path.join(base, "bin", "python")
    if system_d2:
        log(f"Detectron2 already importable from {system_d2}: keeping it and its torch untouched")
        missing = [pkg for mod, pkg in SYSTEM_MODE_EXTRAS.items()
                   if importlib.util.find_spec(mod) is None]
        if missing:
            run_step(f"installing missing helpers ({', '.join(missing)})",
                     [py, "-m", "pip", "install", *missing], logfile, net_todo)
    else:
        run_step("installing pinned requirements (torch, torchvision, fvcore, pycocotools, "
                 "opencv, pytest; ~5 GB on a cold cache)",
                 [py, "-m", "pip", "install", "-r", LOCK_FILE], logfile, net_todo)
        install_detectron2(py, wheel_cache, logfile, net_todo)
    run_step("checking the environment (torchvision ops on CPU, Detectron2 imports)",
             [py, "-c", CHECK_SCRIPT], logfile,
             "the packages installed but do not work together; read the log above, then run "
             "`make clean-env setup` for a clean rebuild")


def install_detectron2(py, wheel_cache, logfile, net_todo):
    os.makedirs(wheel_cache, exist_ok=True)
    wheels = [w for w in os.listdir(wheel_cache) if w.startswith("detectron2-")]
    if not wheels:
        with tempfile.TemporaryDirectory(prefix="d2sdist-") as tmp:
            # --no-build-isolation: pip prepares the sdist's metadata with the torch just
            # installed (its setup.py imports torch); nothing is compiled here.
            run_step(f"downloading the {SDIST_SPEC} sdist (Detectron2 v0.6 Python code)",
                     [py, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                      "--dest", tmp, SDIST_SPEC], logfile, net_todo)
            sdists = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
            if len(sdists) != 1:
                raise SetupError("downloading the Detectron2 sdist",
                                 f"expected one .tar.gz, pip saved {sdists}", net_todo)
            run_step("building a Detectron2 wheel without the compiled extension",
                     [py, os.path.join(ENV_TOOLS, "build_detectron2_wheel.py"),
                      os.path.join(tmp, sdists[0]), wheel_cache], logfile,
                     "read the log above; the sdist must match the pinned sha256")
        wheels = [w for w in os.listdir(wheel_cache) if w.startswith("detectron2-")]
    run_step("installing Detectron2 v0.6 (pip package `detectron2`)",
             [py, "-m", "pip", "install", "--no-deps", "--force-reinstall",
              os.path.join(wheel_cache, wheels[0])], logfile, net_todo)


def ensure_base_env(logfile):
    system_d2 = existing_detectron2()
    key = env_key(system_d2)
    root = cache_root()
    envs = os.path.join(root, "envs")
    os.makedirs(envs, exist_ok=True)
    name = f"py{sys.version_info[0]}.{sys.version_info[1]}-{key}"
    base = os.path.join(envs, name)
    with file_lock(os.path.join(envs, name + ".lock")):
        mark = os.path.join(base, COMPLETE_MARK)
        if os.path.exists(mark):
            return base, key
        if os.path.exists(base):
            log(f"removing the incomplete environment {base} (an earlier set-up did not finish)")
            shutil.rmtree(base)
        log(f"building the base environment in {base} (log: {logfile})")
        try:
            build_base_env(base, system_d2, os.path.join(root, "wheels", key), logfile)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)  # never leave a half-built env behind
            raise
        with open(mark, "w") as f:
            json.dump({"key": key, "python": sys.executable, "system_detectron2": system_d2,
                       "built": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return base, key


def checkout_stamp(base, key):
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        setup_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"base": base, "key": key, "setup_py": setup_hash, "root": ROOT}


def ensure_checkout_venv(base, key, logfile):
    stamp_path = os.path.join(VENV, COMPLETE_MARK)
    want = checkout_stamp(base, key)
    with contextlib.suppress(OSError, ValueError):
        with open(stamp_path) as f:
            if json.load(f) == want:
                return
    if os.path.lexists(VENV):
        shutil.rmtree(VENV) if os.path.isdir(VENV) and not os.path.islink(VENV) else os.remove(VENV)
    run_step("creating .venv for this checkout",
             [os.path.join(base, "bin", "python"), "-m", "venv", "--without-pip", VENV], logfile,
             "check that the checkout folder is writable")
    base_site = subprocess.check_output(
        [os.path.join(base, "bin", "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    venv_site = subprocess.check_output(
        [os.path.join(VENV, "bin", "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(os.path.join(venv_site, "_fpn_plugin_base_env.pth"), "w") as f:
        # addsitedir (not a bare path) so the base environment's own .pth files run too.
        f.write(f"import site; site.addsitedir({base_site!r})\n")
    py = os.path.join(VENV, "bin", "python")
    run_step("installing fpn_plugin (editable) into .venv",
             [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT],
             logfile, "read the log above; setup.py may be broken")
    where = subprocess.check_output(
        [py, "-c", "import fpn_plugin, os; print(os.path.dirname(fpn_plugin.__file__))"],
        text=True, cwd="/").strip()
    if os.path.realpath(where) != os.path.realpath(os.path.join(ROOT, "fpn_plugin")):
        raise SetupError("checking the editable install",
                         f".venv imports fpn_plugin from {where}, not from this checkout",
                         "run `make clean-env setup`")
    with open(stamp_path, "w") as f:
        json.dump(want, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    root = cache_root()
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    logfile = os.path.join(root, "logs", time.strftime("setup-%Y%m%d-%H%M%S.log"))
    try:
        base, key = ensure_base_env(logfile)
        ensure_checkout_venv(base, key, logfile)
    except SetupError as e:
        print(f"\n[setup] FAILED at step: {e.step}\n[setup] why: {e.why}\n"
              f"[setup] what to do: {e.todo}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[setup] interrupted; the partial environment was removed", file=sys.stderr)
        return 130
    log(f"environment ready: {os.path.relpath(VENV)}/bin/python (base: {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
