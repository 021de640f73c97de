"""
Checkpoint loading that never runs code from the file, with clear errors.

``SafeDetectionCheckpointer`` is Detectron2's ``DetectionCheckpointer`` with a different way of
*reading* files; everything else (saving, resuming, model-zoo name heuristics, ``.pkl``
checkpoints of the model zoo) is inherited, so training code can use it as a drop-in:

- ``.pth`` / ``.pyth``: ``torch.load(..., weights_only=True)`` (tensors, plain containers and
  numpy arrays only).
- ``.pkl`` (Detectron2 model zoo / Detectron1): a restricted unpickler that accepts only the
  globals needed to rebuild numpy arrays, so a crafted pickle cannot call anything else.
- A missing, unreadable or corrupt file raises :class:`CheckpointError` naming the file; with
  ``strict=True`` a checkpoint whose keys or shapes differ from the model raises
  :class:`CheckpointMismatchError` naming the file and the first offending keys.
"""
import collections
import inspect
import logging
import os
import pickle
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "SafeDetectionCheckpointer",
    "load_checkpoint_file",
    "load_model_weights",
]

logger = logging.getLogger(__name__)

# Phrases of torch's and our unpicklers' "this object is not allowed" errors (vs. corrupt data).
_REFUSED_MARKERS = ("unsupported global", "refusing to load global", "not an allowed global",
                    "Can only build", "allowlisted")

# How many offending keys an error message lists per kind.
_KEYS_IN_MESSAGE = 5


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt or holds something other than weights."""


class CheckpointMismatchError(CheckpointError):
    """
    A checkpoint's weights do not fit the model (raised only by strict loading).

    Attributes:
        path (str): the checkpoint file.
        missing_keys (list[str]): model parameters/buffers the checkpoint lacks.
        unexpected_keys (list[str]): checkpoint entries the model has no place for.
        incorrect_shapes (list[tuple[str, tuple, tuple]]): (key, checkpoint shape, model shape).
    """

    def __init__(self, path: str, missing_keys, unexpected_keys, incorrect_shapes):
        self.path = path
        misshapen = {k for k, _, _ in incorrect_shapes}
        # fvcore drops misshapen entries before loading, so they also come back as "missing".
        self.missing_keys = [k for k in missing_keys if k not in misshapen]
        self.unexpected_keys = list(unexpected_keys)
        self.incorrect_shapes = list(incorrect_shapes)
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = []
        for what, items in (("missing in the checkpoint", self.missing_keys),
                            ("unexpected in the checkpoint", self.unexpected_keys)):
            if items:
                parts.append(f"{len(items)} key(s) {what}, first: {_first(items)}")
        if self.incorrect_shapes:
            shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})"
                     for k, a, b in self.incorrect_shapes[:_KEYS_IN_MESSAGE]]
            parts.append(f"{len(self.incorrect_shapes)} shape mismatch(es), first: "
                         + ", ".join(shown))
        return (f"checkpoint {self.path!r} does not match the model: " + "; ".join(parts)
                + ". Check that the config (e.g. MODEL.ROI_HEADS.NUM_CLASSES, backbone depth, "
                "FPN channels) is the one the weights were trained with.")


def _first(keys: List[str]) -> str:
    shown = ", ".join(keys[:_KEYS_IN_MESSAGE])
    return shown + (", ..." if len(keys) > _KEYS_IN_MESSAGE else "")


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    """
    The globals a pickle needs to rebuild numpy arrays and scalars, keyed by the
    (module, name) a pickle refers to them by. Pickles written under numpy 1.x name
    ``numpy.core``; under numpy 2.x, ``numpy._core``; both are accepted.
    """
    core = getattr(np, "_core", None)
    multiarray = getattr(core, "multiarray", None) if core is not None else None
    if multiarray is None or not hasattr(multiarray, "_reconstruct"):
        multiarray = np.core.multiarray
    numeric = getattr(core, "numeric", None) if core is not None else None
    if numeric is None or not hasattr(numeric, "_frombuffer"):
        numeric = np.core.numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(prefix + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(prefix + ".multiarray", "scalar")] = multiarray.scalar
        # Pickle protocol 5 rebuilds arrays from a bytes buffer.
        allowed[(prefix + ".numeric", "_frombuffer")] = numeric._frombuffer
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles some dtypes by their class
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                allowed[("numpy.dtypes", name)] = getattr(dtypes, name)
    return allowed


def _pickle_globals() -> Dict[Tuple[str, str], Any]:
    allowed = _numpy_globals()
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # Python 3 writes bytes as _codecs.encode(str, "latin1") in pickle protocol < 3.
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build containers and numpy arrays, and nothing that runs code."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _NumpyOnlyUnpickler._allowed is None:
            _NumpyOnlyUnpickler._allowed = _pickle_globals()
        try:
            return _NumpyOnlyUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays and plain "
                "containers are allowed in a .pkl checkpoint"
            ) from None


def _torch_load_weights_only(path: str):
    """``torch.load(weights_only=True)``, also accepting numpy arrays where torch can."""
    if "weights_only" not in inspect.signature(torch.load).parameters:
        # Never fall back to a full unpickle: that would run code from the file.
        raise CheckpointError(f"cannot load {path!r} safely: torch {torch.__version__} has no "
                              "torch.load(weights_only=True); use torch >= 1.13")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: the default weights-only allow-list
        return torch.load(path, map_location="cpu", weights_only=True)
    allowed = list(_numpy_globals().values())
    # torch checks the class of each dtype it rebuilds (numpy.dtype[float32], ...).
    allowed += [type(np.dtype(t)) for t in set(getattr(np, "sctypeDict", {}).values())]
    with safe_globals(list({id(v): v for v in allowed}.values())):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_file(path: str) -> Any:
    """
    Read a checkpoint file without running code from it.

    Args:
        path (str): a local ``.pth``/``.pyth`` (torch) or ``.pkl`` (pickle of numpy arrays) file.

    Returns:
        the deserialized object (usually a dict).

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt, or contains objects other
            than tensors, numpy arrays and plain containers (the message names the file and
            the refused object).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                # latin1: Detectron1 / Caffe2 checkpoints are Python 2 pickles.
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        return _torch_load_weights_only(path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        reason = str(e).strip()
        if any(marker.lower() in reason.lower() for marker in _REFUSED_MARKERS):
            raise CheckpointError(
                f"checkpoint {path!r} contains objects other than weights and was not loaded "
                "(loading it would run code from the file). Re-save it as a plain state dict, "
                "e.g. torch.save({'model': model.state_dict()}, path). Details: "
                + _first_line(reason)
            ) from e
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or not a checkpoint: {_first_line(reason)}"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError,
            IndexError, KeyError, TypeError) as e:
        # torch raises RuntimeError for a bad zip archive, pickle raises EOFError/ValueError/...
        # for truncated or random bytes.
        detail = "the file is empty or truncated" if isinstance(e, EOFError) else \
            f"{type(e).__name__}: {_first_line(str(e))}"
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or not a checkpoint ({detail})") from e


def _first_line(text: str) -> str:
    """The informative line of an unpickling error (torch wraps it in boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in text.splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(boilerplate):
            return line
    return "(no details)"


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` that reads files with :func:`load_checkpoint_file`.

    Same constructor and methods as ``DetectionCheckpointer`` (so it replaces it in a trainer:
    ``trainer.checkpointer = SafeDetectionCheckpointer(model, save_dir, optimizer=..., ...)``).

    Args:
        model (nn.Module): the model to load into.
        save_dir (str): where ``save`` writes checkpoints.
        strict (bool): if True, ``load`` raises :class:`CheckpointMismatchError` when the
            checkpoint lacks model keys, has extra keys or has keys of another shape.
            If False (Detectron2's behaviour, right for fine-tuning), those are logged and skipped.
            After a mismatch error the model may be partly loaded: discard it.
        save_to_disk, checkpointables: as in ``DetectionCheckpointer``.
    """

    def __init__(self, model, save_dir="", *, strict: bool = False, save_to_disk=None,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self._loading_path: Optional[str] = None

    def load(self, path, *args, **kwargs):
        """
        Load ``path`` (a local file, or a URL / ``detectron2://`` path that Detectron2's
        PathManager can fetch). An empty path loads nothing, as in Detectron2.

        Raises:
            CheckpointError: missing, corrupt or non-weight file.
            CheckpointMismatchError: with ``strict=True``, weights that do not fit the model.
        """
        if path:
            local = path
            if not os.path.isfile(local):
                try:
                    local = self.path_manager.get_local_path(path)
                except Exception as e:  # a URL that cannot be fetched, an unknown prefix
                    raise CheckpointError(f"checkpoint file not found: {path!r} ({e})") from e
                if not os.path.isfile(local):
                    raise CheckpointError(f"checkpoint file not found: {path!r}")
            path = local
        self._loading_path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading_path = None

    def _load_file(self, filename):
        data = load_checkpoint_file(filename)
        if not isinstance(data, dict):
            raise CheckpointError(
                f"checkpoint {filename!r} holds a {type(data).__name__}, not a dict of weights"
            )
        if filename.endswith(".pkl"):
            if "model" in data and "__author__" in data:  # Detectron2 model zoo format
                return data
            # Detectron1 / Caffe2 format: blob names need Detectron2's renaming heuristics.
            blobs = data.get("blobs", data)
            blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
            return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls checkpoints
            if "model_state" not in data:
                raise CheckpointError(
                    f"checkpoint {filename!r}: pycls (.pyth) checkpoints must contain 'model_state'"
                )
            state = {k: v for k, v in data["model_state"].items()
                     if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        # A native checkpoint: exact key names (no renaming heuristics), so a mismatch shows.
        if "model" not in data:
            data = {"model": data}
        if not isinstance(data["model"], dict):
            raise CheckpointError(
                f"checkpoint {filename!r}: 'model' is a {type(data['model']).__name__}, "
                "not a state dict"
            )
        return data

    def _load_model(self, checkpoint):
        path = self._loading_path or "<checkpoint>"
        bad = [k for k, v in checkpoint["model"].items()
               if not isinstance(v, (np.ndarray, torch.Tensor))]
        if bad:
            raise CheckpointError(
                f"checkpoint {path!r}: entries of 'model' must be tensors or numpy arrays; "
                f"not so for {_first(bad)}"
            )
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible is not None and (
            incompatible.missing_keys or incompatible.unexpected_keys
            or incompatible.incorrect_shapes
        ):
            raise CheckpointMismatchError(path, incompatible.missing_keys,
                                          incompatible.unexpected_keys,
                                          incompatible.incorrect_shapes)
        return incompatible


def load_model_weights(model, path: str, *, strict: bool = True) -> Dict[str, Any]:
    """
    Load weights into ``model`` safely (see :class:`SafeDetectionCheckpointer`).

    Args:
        model (nn.Module): e.g. from ``detectron2.modeling.build_model(cfg)``.
        path (str): checkpoint file (``.pth``, ``.pkl``, ``.pyth``) or Detectron2 URL.
        strict (bool): raise :class:`CheckpointMismatchError` on missing/unexpected/misshapen keys.

    Returns:
        dict: the checkpoint's other entries (e.g. ``iteration``), as Detectron2 returns them.
    """
    if not path:
        raise CheckpointError("no checkpoint given (empty path)")
    return SafeDetectionCheckpointer(model, strict=strict).load(path, checkpointables=[])
