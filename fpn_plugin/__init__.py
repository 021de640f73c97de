"""
fpn_plugin: feature pyramid components for Detectron2.

Importing the package registers its components in Detectron2's registries (backbone
builders, proposal generator, RPN head, mask heads); ``add_fpn_plugin_config(cfg)`` adds the
config keys they read.
"""
from . import mask_head, neck, rpn  # noqa: F401  (registers the components)
from .config import add_fpn_plugin_config
from .utils.env import has_compiled_ops

__version__ = "0.1.0"
__all__ = ["add_fpn_plugin_config", "has_compiled_ops"]
