"""
The reading boundary's door for weights files: :mod:`fpn_plugin.checkpoint` (weights-only
unpickling, atomic saving, resuming from the newest intact checkpoint inside the folder).
"""
from ..checkpoint import (CheckpointError, CheckpointMismatchError, SafeDetectionCheckpointer,
                          load_checkpoint_file, load_model_weights)

__all__ = ["CheckpointError", "CheckpointMismatchError", "SafeDetectionCheckpointer",
           "load_checkpoint_file", "load_model_weights"]
