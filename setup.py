#!/usr/bin/env python
"""fpn_plugin: FPN neck, per-level RPN and mask heads for Detectron2.

Torch, torchvision and Detectron2 are deliberately not in install_requires: GPU users install
them for their CUDA version (Detectron2 from source), and pip must not replace those builds.
CPU machines get a pinned environment from `make setup` (tools/env/setup_env.py).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    README = f.read()

setup(
    name="fpn_plugin",
    version="0.1.0",
    description="FPN neck, per-level RPN and mask heads for Detectron2",
    long_description=README,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["fpn_plugin", "fpn_plugin.*"]),
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
)
