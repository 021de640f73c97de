"""Shared by the tests that feed the plugin hostile input: a pickle that runs a command, and
setting Detectron2 dataset names aside while a test registers its own under them."""
import contextlib
import os
import pickle

import torch

__all__ = ["RunsCode", "code_running_checkpoint", "datasets_set_aside"]


class RunsCode:
    """Pickles to a call of os.system that creates ``marker``: what a malicious file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_running_checkpoint(path, marker, key="backbone.bottom_up.stem.conv1.weight") -> str:
    """Write a checkpoint whose loading by pickle would create ``marker``: a ``.pkl`` pickle
    (Detectron2 model-zoo style) or a ``torch.save`` file, by the suffix of ``path``."""
    payload = {"model": {key: RunsCode(marker)}, "iteration": 9, "__author__": "x"}
    if str(path).endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, str(path))
    return str(path)


@contextlib.contextmanager
def datasets_set_aside(names):
    """Remove ``names`` from Detectron2's catalogs for the block (other tests of the process may
    have registered them), drop what the block registered under them, restore the originals."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    saved = {n: (DatasetCatalog.pop(n), MetadataCatalog.pop(n, None))
             for n in names if n in DatasetCatalog}
    try:
        yield
    finally:
        for n in names:
            if n in DatasetCatalog:
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)
        for n, (dataset, metadata) in saved.items():
            DatasetCatalog[n] = dataset
            if metadata is not None:
                MetadataCatalog[n] = metadata
