"""
Unpickling that cannot run code: only plain containers, numpy arrays and an explicit list of
harmless globals are rebuilt. Used for Detectron2 model-zoo ``.pkl`` checkpoints and
precomputed-proposal files, both plain pickles of numpy arrays.
"""
import collections
import pickle
from typing import IO, Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["RefusedGlobalError", "load_pickle_of_arrays", "numpy_globals"]

Globals = Dict[Tuple[str, str], Any]


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global (class or function) that is not allowed."""


def numpy_globals() -> Globals:
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


def _plain_globals() -> Globals:
    allowed = numpy_globals()
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # Python 3 writes bytes as _codecs.encode(str, "latin1") in pickle protocol < 3.
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: Globals, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refusing to load global '{module}.{name}': only numpy arrays and plain "
                "containers are allowed"
            ) from None


def load_pickle_of_arrays(file: IO[bytes], extra_globals: Optional[Globals] = None) -> Any:
    """
    Unpickle ``file`` allowing only containers, numpy arrays/scalars and ``extra_globals``.

    Args:
        file: a binary file object.
        extra_globals: more (module, name) -> object entries to allow (e.g. an Enum class).

    Raises:
        RefusedGlobalError: the pickle refers to any other global (nothing of it was called).
        pickle.UnpicklingError, EOFError, ...: corrupt data, as ``pickle.load`` raises them.
    """
    allowed = _plain_globals()
    allowed.update(extra_globals or {})
    # latin1: Detectron1 / Caffe2 files are Python 2 pickles.
    return _RestrictedUnpickler(file, allowed, encoding="latin1").load()
