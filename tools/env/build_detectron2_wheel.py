#!/usr/bin/env python
"""Build an installable Detectron2 v0.6 wheel from the ``pb1-detectron2`` sdist on PyPI.

The sdist holds the official v0.6 Python code but not ``detectron2/layers/csrc``, so its own
``setup.py`` fails while compiling the extension. This script repackages the Python code
(and the model-zoo configs and the three projects the official setup installs under
``detectron2.projects``) into a pure-Python wheel named ``detectron2``, adding
``detectron2/_C.py`` from ``detectron2_c_placeholder.py`` so ``import detectron2.layers`` works
and compiled ops raise a clear error. The wheel is a normal pip-managed package: it shows in
``pip list`` and ``pip uninstall detectron2`` removes it.

Usage: build_detectron2_wheel.py SDIST.tar.gz OUT_DIR   (prints the wheel path)
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

SDIST_NAME = "pb1-detectron2-0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_VERSION = "0.6+nocsrc"
HERE = os.path.dirname(os.path.abspath(__file__))

# Where the official setup.py maps its bundled projects (package -> folder in the sdist).
PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}

# Detectron2 v0.6's runtime requirements, minus black (only formats LazyConfig dumps) and
# future/pydot (caffe2 export only). Versions are pinned by requirements/cpu-lock.txt.
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

SETUP_PY = '''\
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version={version!r},
    description="Detectron2 v0.6 Python code (from the pb1-detectron2 sdist) without compiled ops",
    url="https://github.com/facebookresearch/detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.6",
    install_requires={requires!r},
)
'''


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_extract(tar, dest):
    root = os.path.realpath(dest)
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(dest, member.name))
        if os.path.commonpath([root, target]) != root:
            raise RuntimeError(f"unsafe path in sdist: {member.name}")
        if member.issym() or member.islnk():
            raise RuntimeError(f"unexpected link in sdist: {member.name}")
    tar.extractall(dest)


def build(sdist, out_dir):
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        raise RuntimeError(
            f"{sdist}: sha256 {actual} does not match the pinned pb1-detectron2 0.6 sdist "
            f"({SDIST_SHA256}); refusing to install unverified code"
        )
    with tempfile.TemporaryDirectory(prefix="d2wheel-") as tmp:
        with tarfile.open(sdist) as tar:
            safe_extract(tar, tmp)
        src = os.path.join(tmp, SDIST_NAME)
        stage = os.path.join(tmp, "stage")
        shutil.copytree(os.path.join(src, "detectron2"), os.path.join(stage, "detectron2"))
        for package, folder in PROJECTS.items():
            dest = os.path.join(stage, *package.split("."))
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(os.path.join(src, folder), dest)
        c_module = os.path.join(stage, "detectron2", "_C.py")
        if os.path.exists(c_module):
            raise RuntimeError("the sdist unexpectedly ships detectron2/_C.py")
        shutil.copyfile(os.path.join(HERE, "detectron2_c_placeholder.py"), c_module)
        with open(os.path.join(stage, "setup.py"), "w") as f:
            f.write(SETUP_PY.format(version=WHEEL_VERSION, requires=REQUIRES))
        os.makedirs(out_dir, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--wheel-dir", out_dir, stage],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    wheels = [w for w in os.listdir(out_dir) if w.startswith("detectron2-") and w.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"expected one detectron2 wheel in {out_dir}, found {wheels}")
    return os.path.join(out_dir, wheels[0])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(build(sys.argv[1], sys.argv[2]))
