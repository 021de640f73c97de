#!/usr/bin/env python
"""Prepare the wheels an offline GPU machine needs beside its preinstalled torch (``make gpu-wheels``).

The GPU machines lent to this project run Python 3.12 with torch, torchvision, numpy, Pillow,
matplotlib, opencv, tensorboard and pytest preinstalled and no network. What they lack is
Detectron2 and a few small packages (``MISSING``). This script puts one wheel of each, at the
version ``requirements/cpu-lock.txt`` pins, into a folder (``.whl/`` by default, ignored by git):
the Detectron2 wheel this checkout's set-up built (pure Python), binary wheels for the target
Python from the registry, and pure-Python wheels built here from the packages that publish
only sdists. ``tools/gpu_check.sh`` installs from that folder with ``pip --no-index``
(``setup_env.py --wheels``). The folder is small (a few MB), as the tree a GPU run carries is
limited.

Run it with the checkout's environment: ``.venv/bin/python tools/env/gpu_wheels.py --dest .whl``.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK_FILE = os.path.join(ROOT, "requirements", "cpu-lock.txt")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import setup_env  # noqa: E402  (the set-up's cache layout and name normalisation)

# What Detectron2 v0.6, fpn_plugin and the tests need that a torch image usually lacks; small
# pure-Python helpers are included as well, since pip has no index to fall back on there.
MISSING = [
    "fvcore", "iopath", "pycocotools", "yacs", "termcolor", "omegaconf", "hydra-core",
    "antlr4-python3-runtime", "portalocker", "tabulate", "cloudpickle", "tqdm", "PyYAML",
]
# Published as sdists only; built into pure-Python wheels here.
SDIST_ONLY = {"fvcore", "antlr4-python3-runtime"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def lock_versions():
    with open(LOCK_FILE) as f:
        pins = dict(line.strip().split("==") for line in f
                    if "==" in line and not line.startswith("#"))
    return {setup_env.normalize(name): version for name, version in pins.items()}


def built_detectron2_wheel():
    """The Detectron2 wheel this checkout's base environment was built with."""
    stamp = os.path.join(ROOT, ".venv", setup_env.COMPLETE_MARK)
    if not os.path.exists(stamp):
        sys.exit("run `make setup` first: the Detectron2 wheel comes from its cache")
    with open(stamp) as f:
        key = json.load(f)["key"]
    found = glob.glob(os.path.join(setup_env.cache_root(), "wheels", key, "detectron2-*.whl"))
    if len(found) != 1:
        sys.exit(f"expected one Detectron2 wheel in the set-up's cache for key {key}, found "
                 f"{found}; run `make clean-env setup`")
    return found[0]


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=os.path.join(ROOT, ".whl"))
    parser.add_argument("--python-version", default="3.12",
                        help="the GPU machine's Python (binary wheels are for this version)")
    args = parser.parse_args()
    versions = lock_versions()
    dest = os.path.abspath(args.dest)
    if os.path.isdir(dest):
        shutil.rmtree(dest)  # one version of each package: stale wheels would conflict
    os.makedirs(dest)
    shutil.copy(built_detectron2_wheel(), dest)
    abi = "cp" + args.python_version.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        for name in MISSING:
            spec = f"{name}=={versions[setup_env.normalize(name)]}"
            if name in SDIST_ONLY:
                pip("wheel", "--no-deps", "--wheel-dir", tmp, spec)
            else:
                platforms = [a for p in PLATFORMS for a in ("--platform", p)]
                pip("download", "--no-deps", "--only-binary=:all:", "--python-version",
                    args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                    "--abi", "none", *platforms, "--dest", tmp, spec)
        for wheel in glob.glob(os.path.join(tmp, "*.whl")):
            shutil.copy(wheel, dest)
    wheels = sorted(os.listdir(dest))
    size = sum(os.path.getsize(os.path.join(dest, w)) for w in wheels)
    print("\n".join(wheels))
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}")


if __name__ == "__main__":
    main()
