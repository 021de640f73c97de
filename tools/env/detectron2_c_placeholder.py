"""Stand-in for ``detectron2._C``, Detectron2's compiled C++/CUDA extension.

This Detectron2 was installed by fpn_plugin's environment set-up from the PyPI sdist
``pb1-detectron2==0.6``, which ships Detectron2's Python code but not the extension sources.
Mask R-CNN with axis-aligned boxes needs none of the compiled ops (NMS and ROIAlign come from
torchvision), so this module lets ``import detectron2.layers`` succeed while every compiled op
raises an error that names the op.

Written for fpn_plugin; not part of Detectron2.
"""

IS_PLACEHOLDER = True

_INSTALL_GUIDE = "https://detectron2.readthedocs.io/en/latest/tutorials/install.html"


class CompiledOpUnavailableError(RuntimeError):
    """Raised when code calls a Detectron2 op that needs the compiled extension."""


def get_compiler_version() -> str:
    # Called by detectron2.utils.collect_env (and so by default_setup); informational only.
    return "not built (detectron2._C is a placeholder; compiled ops unavailable)"


def get_cuda_version() -> str:
    return "not built"


def has_cuda() -> bool:
    return False


def _unavailable_op(name: str):
    def op(*args, **kwargs):
        raise CompiledOpUnavailableError(
            f"detectron2._C.{name} is a compiled Detectron2 op, and this Detectron2 was "
            "installed without its C++/CUDA extension (fpn_plugin's CPU set-up installs the "
            f"Python-only pb1-detectron2 sdist). To use {name}, build Detectron2 from source "
            f"({_INSTALL_GUIDE})."
        )

    op.__name__ = op.__qualname__ = name
    return op


def __getattr__(name: str):
    # Dunder lookups (``__path__``, ``__wrapped__``...) come from import machinery and
    # introspection; they must stay plain AttributeErrors.
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return _unavailable_op(name)
