"""
fpn_plugin: feature pyramid components for Detectron2.

Importing the package registers its components in Detectron2's registries (backbone
builders, proposal generator, RPN head, mask heads); ``add_fpn_plugin_config(cfg)`` adds the
config keys they read.
"""
import warnings

with warnings.catch_warnings():
    # Importing Detectron2 runs its @torch.jit.script decorators, which recent torch marks as
    # deprecated with a FutureWarning its users cannot act on.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    from . import mask_head, neck, rpn  # noqa: F401  (registers the components)
from .config import add_fpn_plugin_config, add_shapes_config, load_config, with_plugin_defaults
from .utils.env import has_compiled_ops

__version__ = "0.2.0"
__all__ = ["add_fpn_plugin_config", "add_shapes_config", "has_compiled_ops", "load_config",
           "with_plugin_defaults"]
