#!/usr/bin/env python
"""fpn_plugin: FPN neck, per-level RPN and mask heads for Detectron2.

Torch, torchvision and Detectron2 are deliberately not in install_requires: GPU users install
them for their CUDA version (Detectron2 from source), and pip must not replace those builds.
CPU machines get a pinned environment from `make setup` (tools/env/setup_env.py).

The repository's configs/ folder is the one source of the configs: a wheel carries a copy of
it made at build time as package data under fpn_plugin/model_zoo/configs (as Detectron2's
setup.py does for detectron2/model_zoo/configs); an editable install reads configs/ itself
(fpn_plugin.model_zoo.config_root).
"""
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")
CONFIG_SUFFIXES = (".yaml", ".py")


def read(*parts):
    with open(os.path.join(HERE, *parts), encoding="utf-8") as f:
        return f.read()


def version():
    """fpn_plugin.__version__, read from the source (importing the package needs torch)."""
    match = re.search(r'^__version__ = "([^"]+)"$', read("fpn_plugin", "__init__.py"), re.M)
    if not match:
        raise RuntimeError("fpn_plugin/__init__.py defines no __version__ = \"...\"")
    return match.group(1)


class BuildPyWithConfigs(build_py):
    """build_py that also copies configs/ (its .yaml and .py files) into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's configs/ directly
        target = os.path.join(self.build_lib, "fpn_plugin", "model_zoo", "configs")
        if os.path.isdir(target):
            shutil.rmtree(target)
        for folder, dirs, files in os.walk(CONFIGS):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(CONFIG_SUFFIXES):
                    src = os.path.join(folder, name)
                    dst = os.path.join(target, os.path.relpath(src, CONFIGS))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)


setup(
    name="fpn_plugin",
    version=version(),
    description="FPN neck, per-level RPN and mask heads for Detectron2",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    project_urls={
        "Detectron2": "https://github.com/facebookresearch/detectron2",
        "FPN paper": "https://arxiv.org/abs/1612.03144",
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    packages=find_packages(include=["fpn_plugin", "fpn_plugin.*"]),
    cmdclass={"build_py": BuildPyWithConfigs},
    python_requires=">=3.8",
    install_requires=[
        "numpy",
        "fvcore",
        "pycocotools>=2.0.2",
        "opencv-python-headless",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-timeout", "psutil"],
        "bench": ["psutil"],
    },
    entry_points={
        "console_scripts": [
            "fpn-plugin-train=fpn_plugin.train:cli",
            "fpn-plugin-export=fpn_plugin.export.cli:main",
            "fpn-plugin-deploy=fpn_plugin.deploy.cli:main",
        ],
    },
)
