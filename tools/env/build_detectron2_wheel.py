#!/usr/bin/env python
"""Build an installable Detectron2 v0.6 wheel from the ``pb1-detectron2`` sdist on PyPI.

The sdist holds the official v0.6 Python code but not ``detectron2/layers/csrc``, so its own
``setup.py`` fails while compiling the extension. This script repackages the Python code
(and the model-zoo configs and the three projects the official setup installs under
``detectron2.projects``) into a pure-Python wheel named ``detectron2``, adding
``detectron2/_C.py`` from ``detectron2_c_placeholder.py`` so ``import detectron2.layers`` works
and compiled ops raise a clear error. The wheel is a normal pip-managed package: it shows in
``pip list`` and ``pip uninstall detectron2`` removes it.

v0.6 predates numpy 1.24 and Pillow 10, which removed aliases it uses (``np.bool``, ``np.int``,
``np.float``, ``np.str``, ``Image.LINEAR``), numpy 2's ``copy=False`` meaning "never copy", and
setuptools 81, which removed ``pkg_resources``. ``SUBSTITUTIONS`` lists the small textual edits
applied to the staged copy so the wheel runs on current numpy/Pillow/setuptools; every edit
names the exact text and how often it must occur, so a different sdist fails the build instead
of being half-patched, and each applied edit is printed (the set-up's log keeps it). Every
edit keeps v0.6's behaviour on the old stack too: ``np.bool`` *was* ``bool``, ``Image.LINEAR``
*was* ``Image.BILINEAR``, ``np.asarray`` is what ``copy=False`` meant before numpy 2, and
``float(h)`` keeps the float64 arithmetic numpy 1 did where numpy 2 (NEP 50) would stay in
float32.
Afterwards ``REMOVED_API`` scans the whole staged tree, so an alias use the list missed fails
the build as well.

Usage: build_detectron2_wheel.py SDIST.tar.gz OUT_DIR   (prints the wheel path)
"""
import hashlib
import os
import re
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


class Substitution:
    """One edit of a file of the staged package: ``old`` -> ``new``, exactly ``count`` times."""

    def __init__(self, path, old, new, count, why):
        self.path, self.old, self.new, self.count, self.why = path, old, new, count, why

    def describe(self):
        return f"{self.path}: {self.old!r} -> {self.new!r} ({self.count}x; {self.why})"


_NP_ALIAS = "numpy 1.24 removed the alias of the builtin"
# numpy 2's promotion rules (NEP 50) keep int / np.float32 in float32; numpy 1 gave float64, and
# the mask targets' rasterization (mask head loss) depends on that ratio.
_NEP50 = "keeps numpy 1's float64 ratio under numpy 2's NEP 50 promotion"
# Paths are relative to the staged tree (the wheel's top level).
SUBSTITUTIONS = (
    Substitution("detectron2/structures/masks.py", "np.bool)", "bool)", 3, _NP_ALIAS),
    Substitution("detectron2/structures/masks.py", "mask_size / max(h, 0.1)",
                 "mask_size / max(float(h), 0.1)", 1, _NEP50),
    Substitution("detectron2/structures/masks.py", "mask_size / max(w, 0.1)",
                 "mask_size / max(float(w), 0.1)", 1, _NEP50),
    Substitution("detectron2/data/build.py", "dtype=np.int", "dtype=int", 2, _NP_ALIAS),
    Substitution("detectron2/data/datasets/pascal_voc.py", "dtype=np.str)", "dtype=str)", 1,
                 _NP_ALIAS),
    Substitution("detectron2/evaluation/pascal_voc_evaluation.py", "astype(np.bool)",
                 "astype(bool)", 2, _NP_ALIAS),
    Substitution("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)", 2,
                 _NP_ALIAS),
    Substitution("detectron2/evaluation/sem_seg_evaluation.py", "np.float)", "float)", 5,
                 _NP_ALIAS),
    Substitution("detectron2/utils/visualizer.py", "astype(np.bool)", "astype(bool)", 3,
                 _NP_ALIAS),
    Substitution("detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)", 1,
                 _NP_ALIAS),
    Substitution("detectron2/layers/mask_ops.py", "np.array(mask, copy=False)",
                 "np.asarray(mask)", 1,
                 "numpy 2's copy=False raises when a copy is needed; asarray copies only then"),
    Substitution("detectron2/data/transforms/transform.py", "interp=Image.LINEAR",
                 "interp=Image.BILINEAR", 1, "Pillow 10 removed LINEAR, an alias of BILINEAR"),
    Substitution("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", 1,
                 "setuptools 81 removed pkg_resources"),
    Substitution("detectron2/model_zoo/model_zoo.py",
                 'pkg_resources.resource_filename(\n        "detectron2.model_zoo", ',
                 "os.path.join(\n        os.path.dirname(os.path.abspath(__file__)), ", 1,
                 "the configs are files next to model_zoo.py in the installed package"),
)

# What no file of the built wheel may use any more (checked after SUBSTITUTIONS).
REMOVED_API = re.compile(
    r"\bnp\.(bool|int|float|complex|object|str|long|unicode)\b(?!_)"
    r"|\bImage\.(LINEAR|CUBIC|ANTIALIAS)\b"
    r"|\bpkg_resources\b"
    r"|\bnp\.array\([^()]*copy=False"
)


def apply_substitutions(stage, substitutions=SUBSTITUTIONS, log=print):
    """Apply every edit to the tree under ``stage``; if any count differs, raise, writing nothing."""
    texts = {}
    for sub in substitutions:
        if sub.path not in texts:
            with open(os.path.join(stage, sub.path), encoding="utf-8") as f:
                texts[sub.path] = f.read()
        found = texts[sub.path].count(sub.old)
        if found != sub.count:
            raise RuntimeError(
                f"substitution in {sub.path}: expected {sub.count} occurrence(s) of {sub.old!r}, "
                f"found {found}; this is not the sdist the substitutions were written for"
            )
        texts[sub.path] = texts[sub.path].replace(sub.old, sub.new)
    for path, text in texts.items():
        with open(os.path.join(stage, path), "w", encoding="utf-8") as f:
            f.write(text)
    for sub in substitutions:
        log(f"substituted {sub.describe()}")


def find_removed_api(stage):
    """``(path, line number, line)`` of every use of REMOVED_API in the .py files under stage."""
    hits = []
    for folder, _, files in os.walk(stage):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if REMOVED_API.search(line):
                        hits.append((os.path.relpath(path, stage), lineno, line.strip()))
    return hits


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
        apply_substitutions(stage)
        leftover = find_removed_api(stage)
        if leftover:
            raise RuntimeError("uses of APIs that current numpy/Pillow/setuptools removed remain "
                               "after the substitutions: " +
                               "; ".join(f"{p}:{n}: {line}" for p, n, line in leftover))
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
