#!/usr/bin/env bash
# A CPU stand-in for the GPU machines' image, for rehearsing tools/gpu_check.sh --cpu: a
# Python 3.12 virtualenv with the image's torch 2.11 / torchvision 0.26 (their CUDA builds run
# on CPU too), numpy 2 and the other packages the image ships that fpn_plugin uses, and none of
# what it lacks (Detectron2, fvcore, iopath, pycocotools, yacs, termcolor, omegaconf, hydra).
# Needs the registry (~5 GB download) and ~6 GB of disk.
# Usage: tools/env/gpu_image_replica.sh DEST [PYTHON3.12]
set -euo pipefail
DEST="${1:?usage: $0 DEST [PYTHON3.12]}"
PY="${2:-python3.12}"
"$PY" -m venv "$DEST"
"$DEST/bin/python" -m pip install -q --upgrade "pip<26.3"
"$DEST/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 "numpy>=2" pillow \
  matplotlib opencv-python-headless tensorboard pytest pytest-xdist pytest-timeout psutil \
  pyyaml tqdm tabulate cloudpickle portalocker typing_extensions packaging setuptools wheel
"$DEST/bin/python" -c "import torch, torchvision.ops as o; print('replica:', torch.__version__, o.nms(torch.zeros(1, 4), torch.ones(1), 0.5))"
