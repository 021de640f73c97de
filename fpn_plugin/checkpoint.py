"""
Checkpoint loading that never runs code from the file, with clear errors.

``SafeDetectionCheckpointer`` is Detectron2's ``DetectionCheckpointer`` with a different way of
*reading* files, atomic saving and a resume that survives a damaged last checkpoint; the rest
(model-zoo name heuristics, ``.pkl`` checkpoints of the model zoo, ``detectron2://`` URLs) is
inherited, so training code uses it as a drop-in (``fpn_plugin.engine.Trainer`` does):

- ``.pth`` / ``.pyth``: ``torch.load(..., weights_only=True)`` (tensors, plain containers and
  numpy arrays only).
- ``.pkl`` (Detectron2 model zoo / Detectron1): a restricted unpickler that accepts only the
  globals needed to rebuild numpy arrays, so a crafted pickle cannot call anything else.
- Paths may carry Detectron2 main's query ``?matching_heuristics=True`` (load a ``.pth`` with
  the model zoo's name-matching heuristics), on Detectron2 v0.6 as well.
- A missing, unreadable or corrupt file raises :class:`CheckpointError` naming the file and
  what is wrong with it; with ``strict=True`` a checkpoint whose keys or shapes differ from the
  model raises :class:`CheckpointMismatchError` naming the file and the first offending keys.
- ``save`` writes a hidden temporary file and renames it, so a killed run never leaves a
  truncated checkpoint (nor a truncated ``last_checkpoint``) under the final name.
- ``resume_or_load(resume=True)``: when the file ``last_checkpoint`` names is missing or
  corrupt, a warning names it and the newest intact periodic checkpoint is loaded instead.
"""
import inspect
import logging
import os
import pickle
import re
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.files import atomic_open
from .utils.safe_pickle import RefusedGlobalError, load_pickle_of_arrays, numpy_globals

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "SafeDetectionCheckpointer",
    "load_checkpoint_file",
    "load_model_weights",
    "split_checkpoint_query",
]

logger = logging.getLogger(__name__)

# Phrases of torch's and our unpicklers' "this object is not allowed" errors (vs. corrupt data).
_REFUSED_MARKERS = ("unsupported global", "refusing to load global", "not an allowed global",
                    "Can only build", "allowlisted", "is blocked")

# How many offending keys an error message lists per kind.
_KEYS_IN_MESSAGE = 5

# Query options a checkpoint path may carry (Detectron2 main's DetectionCheckpointer syntax).
_QUERY_OPTIONS = ("matching_heuristics", "strict")

# Names PeriodicCheckpointer gives checkpoints ("model_0004999.pth", "model_final.pth").
_PERIODIC_NAME = re.compile(r"^model_(\d+|final)\.pth$")


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


def _torch_load_weights_only(path: str):
    """``torch.load(weights_only=True)``, also accepting numpy arrays where torch can."""
    if "weights_only" not in inspect.signature(torch.load).parameters:
        # Never fall back to a full unpickle: that would run code from the file.
        raise CheckpointError(f"cannot load {path!r} safely: torch {torch.__version__} has no "
                              "torch.load(weights_only=True); use torch >= 1.13")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: the default weights-only allow-list
        return torch.load(path, map_location="cpu", weights_only=True)
    allowed = list(numpy_globals().values())
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
                return load_pickle_of_arrays(f)
        return _torch_load_weights_only(path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        reason = str(e).strip()
        if isinstance(e, RefusedGlobalError) or any(
                marker.lower() in reason.lower() for marker in _REFUSED_MARKERS):
            raise CheckpointError(
                f"checkpoint {path!r} holds objects other than weights ({_refusal_reason(reason)})"
                " and was not loaded: a weights-only load rebuilds nothing but tensors, numpy "
                "arrays and plain containers (rebuilding other objects can run code from the "
                "file). If you "
                "trust the file, re-save its weights as a plain state dict, e.g. "
                "torch.save({'model': model.state_dict()}, 'weights.pth')."
            ) from e
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or not a checkpoint: {_first_line(reason)}"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError,
            IndexError, KeyError, TypeError, MemoryError, OverflowError) as e:
        # torch raises RuntimeError for a bad zip archive, pickle raises EOFError/ValueError/...
        # for truncated or random bytes.
        detail = "the file is empty or truncated" if isinstance(e, EOFError) else \
            f"{type(e).__name__}: {_first_line(str(e))}"
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or not a checkpoint ({detail})") from e


def _refusal_reason(text: str) -> str:
    """What a refused load tripped over, e.g. "a 'posix.system' object"."""
    match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global '([\w.]+)'", text)
    if match:
        return f"a {match.group(1)!r} object"
    return _first_line(text)


def _first_line(text: str) -> str:
    """The informative line of an unpickling error (torch wraps it in boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation",
                   "(1)", "(2)")
    for line in text.splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(boilerplate):
            return line
    return "(no details)"


def split_checkpoint_query(path: str) -> Tuple[str, Dict[str, bool]]:
    """
    Split Detectron2 main's query syntax off a checkpoint path or URL.

    ``"model.pth?matching_heuristics=True"`` -> ``("model.pth", {"matching_heuristics": True})``.
    An existing local file whose name contains ``?`` is returned unchanged.

    Raises:
        CheckpointError: an unknown query option or a value other than True/False.
    """
    if not path or os.path.isfile(path) or "?" not in path:
        return path, {}
    parsed = urlparse(path)
    if not parsed.query:
        return path, {}
    options = {}
    for key, values in parse_qs(parsed.query, keep_blank_values=True).items():
        if key not in _QUERY_OPTIONS or values[-1] not in ("True", "False"):
            raise CheckpointError(
                f"checkpoint {path!r}: unsupported query option {key}={values[-1]!r} "
                f"(supported: {', '.join(o + '=True|False' for o in _QUERY_OPTIONS)})")
        options[key] = values[-1] == "True"
    return parsed._replace(query="").geturl(), options


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` that reads files with :func:`load_checkpoint_file`, saves
    atomically and resumes from the newest intact checkpoint (see the module docstring).

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
        self._query: Dict[str, bool] = {}
        self._read_ahead: Optional[Tuple[str, dict]] = None

    def load(self, path, *args, **kwargs):
        """
        Load ``path`` (a local file, or a URL / ``detectron2://`` path that Detectron2's
        PathManager can fetch, optionally with ``?matching_heuristics=True``). An empty path
        loads nothing, as in Detectron2.

        Raises:
            CheckpointError: missing, corrupt or non-weight file, or an unknown query option.
            CheckpointMismatchError: with ``strict=True``, weights that do not fit the model.
        """
        query: Dict[str, bool] = {}
        if path:
            path, query = split_checkpoint_query(path)
            local = path
            if not os.path.isfile(local):
                try:
                    local = self.path_manager.get_local_path(path)
                except Exception as e:  # a URL that cannot be fetched, an unknown prefix
                    raise CheckpointError(f"checkpoint file not found: {path!r} ({e})") from e
                if not os.path.isfile(local):
                    raise CheckpointError(f"checkpoint file not found: {path!r}")
            path = local
        self._loading_path, self._query = path, query
        try:
            if path:
                # Read and check the file before Detectron2's loader starts: a refused file
                # then raises before it changes any of its state (main's loader keeps the
                # URL it is loading until it returns, and refuses to start another load).
                self._read_ahead = (path, self._read_file(path))
            return super().load(path, *args, **kwargs)
        finally:
            self._loading_path, self._query, self._read_ahead = None, {}, None

    def get_checkpoint_file(self) -> str:
        """
        The checkpoint ``last_checkpoint`` names, which must be a file inside ``save_dir``.

        Raises:
            CheckpointError: ``last_checkpoint`` names an absolute path or one that leads out
                of the folder (``../elsewhere/model.pth``): it is never followed.
        """
        path = super().get_checkpoint_file()
        folder = self._local_save_dir()
        if folder is None:
            return path
        root = os.path.abspath(folder)
        target = os.path.abspath(path)
        if os.path.dirname(target) != root:
            raise CheckpointError(
                f"{os.path.join(folder, 'last_checkpoint')} names {path!r}, which is not a file "
                f"in {folder!r}; a checkpoint outside the output folder is never followed")
        return path

    def _load_file(self, filename):
        if self._read_ahead is not None and self._read_ahead[0] == filename:
            return self._read_ahead[1]
        return self._read_file(filename)

    def _read_file(self, filename: str) -> dict:
        """The checkpoint dict of ``filename``, read safely (``load_checkpoint_file``)."""
        data = load_checkpoint_file(filename)
        if not isinstance(data, dict):
            raise CheckpointError(
                f"checkpoint {filename!r} holds a {type(data).__name__}, not a dict of weights"
            )
        data = self._standard_format(filename, data)
        if self._query.get("matching_heuristics"):  # as main: only "True" changes anything
            data["matching_heuristics"] = True
        return data

    @staticmethod
    def _standard_format(filename: str, data: dict) -> dict:
        """Detectron2's checkpoint dict ({"model": ..., ...}) of each file format."""
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

    # -- saving --------------------------------------------------------------------------
    def _local_save_dir(self) -> Optional[str]:
        """``save_dir`` if it is a local folder path (atomic saving needs os.replace)."""
        if not self.save_dir or "://" in str(self.save_dir):
            return None
        return str(self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        """
        Save the model and checkpointables to ``<save_dir>/<name>.pth`` (as Detectron2 does)
        through a hidden temporary file that is renamed when complete, then point
        ``last_checkpoint`` at it (also atomically).
        """
        folder = self._local_save_dir()
        if folder is None or not self.save_to_disk:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        if os.path.basename(basename) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        folder = self._local_save_dir()
        if folder is None:
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_open(os.path.join(folder, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    # -- resuming ------------------------------------------------------------------------
    def _resume_candidates(self, failures: List[str]) -> List[str]:
        """The file ``last_checkpoint`` names, then periodic checkpoints, newest first (a
        ``last_checkpoint`` naming a file outside the folder is added to ``failures``)."""
        try:
            named = [self.get_checkpoint_file()]
        except CheckpointError as e:
            failures.append(str(e))
            logger.warning(f"Cannot resume from last_checkpoint: {e}")
            named = []
        folder = self._local_save_dir()
        periodic = []
        if folder is not None and os.path.isdir(folder):
            for entry in os.listdir(folder):
                match = _PERIODIC_NAME.match(entry)
                if match:
                    order = float("inf") if match.group(1) == "final" else int(match.group(1))
                    periodic.append((order, os.path.join(folder, entry)))
        ordered = [p for _, p in sorted(periodic, reverse=True)]
        named_abs = {os.path.abspath(p) for p in named}
        return named + [p for p in ordered if os.path.abspath(p) not in named_abs]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """
        As Detectron2's: with ``resume`` and a ``last_checkpoint`` in ``save_dir``, load that
        checkpoint with every checkpointable (optimizer, scheduler, iteration); otherwise load
        only the model weights of ``path``.

        When the checkpoint ``last_checkpoint`` names is missing or corrupt (a run killed
        while writing it, a disk error), a warning names it and the newest intact periodic
        checkpoint (``model_<iteration>.pth``) is loaded instead.

        Raises:
            CheckpointError: resuming was asked for but no checkpoint in ``save_dir`` is
                intact (the message lists each file and what is wrong with it).
        """
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        failures: List[str] = []
        for candidate in self._resume_candidates(failures):
            try:
                loaded = self.load(candidate)
            except CheckpointMismatchError:
                raise  # the config changed: another checkpoint would not fit either
            except CheckpointError as e:
                failures.append(str(e))
                logger.warning(f"Cannot resume from {candidate}: {e}")
                continue
            if failures:
                logger.warning(
                    f"Resuming from {candidate}, the newest intact checkpoint in "
                    f"{self.save_dir}; skipped: " + " | ".join(failures))
            return loaded
        raise CheckpointError(
            f"cannot resume: no intact checkpoint in {self.save_dir!r} ("
            + " | ".join(failures) + "). Start without --resume, or restore a checkpoint.")

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
        strict = self._query.get("strict", self.strict)  # "model.pth?strict=False" relaxes it
        if strict and incompatible is not None and (
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
