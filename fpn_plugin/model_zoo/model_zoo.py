"""
Config files by name: the plugin's own (``configs/`` of the repository, shipped in the wheel)
and Detectron2's (its installed model zoo), read without importing ``detectron2.model_zoo``.

Detectron2 v0.6's ``detectron2.model_zoo`` imports ``pkg_resources`` at import time, which
setuptools 81 removed; the plugin's LazyConfig files read Detectron2's recipes through
:func:`get_detectron2_config` so that they load wherever Detectron2 itself imports.
"""
import difflib
import importlib.util
import os
import warnings
from typing import List, Optional

__all__ = ["config_root", "get", "get_config", "get_config_file", "get_detectron2_config",
           "get_detectron2_config_file", "list_configs"]

CONFIG_SUFFIXES = (".yaml", ".py")
_HERE = os.path.dirname(os.path.abspath(__file__))
# In a wheel: package data next to this file. In a checkout (editable install, PYTHONPATH):
# the repository's configs/ folder, the one source the wheel's copy is built from (setup.py).
_PACKAGED = os.path.join(_HERE, "configs")
_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs")

NO_WEIGHTS = ("fpn_plugin's model zoo has no trained weights: the model is freshly initialized "
              "(train it, or load a checkpoint with DetectionCheckpointer)")


def config_root() -> str:
    """
    The folder the config names are relative to: ``fpn_plugin/model_zoo/configs`` in an
    installed wheel, else the checkout's ``configs/``.

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    for root in (_PACKAGED, _CHECKOUT):
        if os.path.isdir(root):
            return root
    raise FileNotFoundError(f"fpn_plugin's configs are missing: neither {_PACKAGED} (installed "
                            f"package data) nor {_CHECKOUT} (a checkout) exists; reinstall")


def _configs_under(root: str) -> List[str]:
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(CONFIG_SUFFIXES) and f != "__init__.py":
                names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return names


def list_configs() -> List[str]:
    """Every config name :func:`get_config_file` accepts, sorted (``common/`` holds the
    pieces other configs import, e.g. ``common/models/mask_rcnn_custom_fpn.py``)."""
    return _configs_under(config_root())


def _resolve(config_path: str, root: str, what: str, names) -> str:
    if not isinstance(config_path, str) or not config_path.strip():
        raise ValueError(f"{what}: a config name is a non-empty string, got {config_path!r}")
    name = config_path.strip().replace("\\", "/")
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or not name.endswith(CONFIG_SUFFIXES):
        raise ValueError(f"{what}: {config_path!r} is not a config name (a relative path under "
                         f"{root} ending in .yaml or .py, e.g. {_example(names())})")
    path = os.path.join(root, *parts)
    if os.path.isfile(path):
        return path
    known = names()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    # A bare file name, or a name in the wrong folder: match on the file name too.
    by_file = {}
    for k in known:
        by_file.setdefault(os.path.basename(k), k)
    close += [by_file[f] for f in difflib.get_close_matches(os.path.basename(name), list(by_file),
                                                            n=3, cutoff=0.6)
              if by_file[f] not in close]
    hint = f"; did you mean: {', '.join(close)}" if close else f"; known names: {_example(known)}"
    raise FileNotFoundError(f"{what}: no config {config_path!r} under {root}{hint}")


def _example(names) -> str:
    return ", ".join(list(names)[:3]) + (" ..." if len(names) > 3 else "")


def get_config_file(config_path: str) -> str:
    """
    The path of one of the plugin's config files.

    Args:
        config_path (str): its name, relative to the configs folder, e.g.
            ``"COCO-InstanceSegmentation/mask_rcnn_R_50_custom_fpn_1x.yaml"``,
            ``"new_baselines/mask_rcnn_R_50_custom_FPN_100ep_LSJ.py"``,
            ``"Demo/mask_rcnn_R_18_custom_fpn_shapes.yaml"`` (:func:`list_configs`).

    Raises:
        FileNotFoundError: no such config (the message lists close names).
        ValueError: not a relative ``.yaml``/``.py`` name.
    """
    root = config_root()
    return _resolve(config_path, root, "fpn_plugin.model_zoo", lambda: _configs_under(root))


def get_config(config_path: str):
    """
    The config of one of the plugin's config files, ready for ``build_model`` (YAML) or
    ``instantiate(cfg.model)`` (LazyConfig).

    - ``.yaml``: a ``CfgNode``: Detectron2's defaults, the plugin's keys
      (``fpn_plugin.config.load_config``), then the file; not frozen.
    - ``.py``: the ``DictConfig`` of ``detectron2.config.LazyConfig.load``.
    """
    path = get_config_file(config_path)
    if path.endswith(".yaml"):
        from ..config import load_config

        return load_config(path, freeze=False)
    from detectron2.config import LazyConfig

    return LazyConfig.load(path)


def get(config_path: str, device: Optional[str] = None):
    """
    The model of one of the plugin's configs, freshly initialized, in eval mode.

    There are no trained weights for these configs (a warning says so): the model's weights
    are its initialization, ``MODEL.WEIGHTS`` / ``train.init_checkpoint`` are not read.
    Train it, or load a checkpoint yourself (``DetectionCheckpointer(model).load(path)``).

    Args:
        config_path (str): a config name (:func:`get_config_file`).
        device (str): e.g. ``"cpu"``, ``"cuda"``; default: the config's device, or ``"cpu"``
            without CUDA.

    Returns:
        torch.nn.Module
    """
    import torch

    cfg = get_config(config_path)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    warnings.warn(NO_WEIGHTS, UserWarning, stacklevel=2)
    if config_path.endswith(".yaml"):
        from detectron2.modeling import build_model

        if device is not None:
            cfg.MODEL.DEVICE = device
        model = build_model(cfg)
    else:
        from detectron2.config import instantiate

        model = instantiate(cfg.model)
        target = device or cfg.get("train", {}).get("device", "cpu")
        model.to(target)
    return model.eval()


def _detectron2_config_root() -> str:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Detectron2 is not installed: its model-zoo configs are needed")
    package = list(spec.submodule_search_locations)[0]
    # A built Detectron2 carries its configs as package data; a source checkout installed in
    # development mode has them next to the package.
    for root in (os.path.join(package, "model_zoo", "configs"),
                 os.path.join(os.path.dirname(package), "configs")):
        if os.path.isdir(root):
            return root
    raise FileNotFoundError(f"Detectron2's model-zoo configs are not installed with it "
                            f"({package}/model_zoo/configs is missing)")


def get_detectron2_config_file(config_path: str) -> str:
    """
    The path of one of Detectron2's own model-zoo configs (the file
    ``detectron2.model_zoo.get_config_file`` returns), found without importing
    ``detectron2.model_zoo``.

    Raises:
        FileNotFoundError: no such config (the message lists close names).
    """
    root = _detectron2_config_root()
    return _resolve(config_path, root, "Detectron2's model zoo", lambda: _configs_under(root))


def get_detectron2_config(config_path: str):
    """
    One of Detectron2's own model-zoo LazyConfig files, loaded: what
    ``detectron2.model_zoo.get_config(config_path)`` returns for a ``.py`` name.
    """
    if not config_path.endswith(".py"):
        raise ValueError(f"get_detectron2_config reads LazyConfig (.py) files, got {config_path!r}")
    from detectron2.config import LazyConfig

    return LazyConfig.load(get_detectron2_config_file(config_path))
