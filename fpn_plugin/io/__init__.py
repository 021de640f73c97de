"""
The trust boundary: every config, dataset, image and checkpoint the plugin reads comes in
through this package, and every file it writes goes out through :class:`OutputFolder`.

Reading:
- YAML configs (:func:`merge_config_file`, :func:`read_yaml_config`): ``yaml.safe_load`` only,
  ``_BASE_`` local files or ``model_zoo://`` names only.
- YAML LazyConfigs (:func:`check_lazy_yaml`): plain YAML, ``_target_`` under an allow-list of
  module prefixes. (A ``.py`` LazyConfig is code by design.)
- COCO JSON (:func:`read_coco_json`, :func:`resolve_image_path`): schema-checked, image paths
  inside the image root.
- Images (:func:`read_image_checked`, :func:`open_image_header`): pixel limit from the header,
  modes and bit depths handled or refused by name, errors naming the file.
- Checkpoints (:class:`SafeDetectionCheckpointer`, :func:`load_checkpoint_file`): nothing in a
  weights file can run code.

Writing: :class:`OutputFolder` (no write outside it or through a symlinked folder; a manifest
of what it wrote, so clean-up never deletes the user's files).
"""
from .checkpoints import (CheckpointError, CheckpointMismatchError, SafeDetectionCheckpointer,
                          load_checkpoint_file, load_model_weights)
from .coco import (CocoSchemaError, ImagePathError, bbox_problem, image_entry_problem,
                   read_coco_json, resolve_image_path)
from .config_files import ConfigFileError, merge_config_file, read_yaml_config, safe_load_yaml_file
from .images import (DEFAULT_MAX_IMAGE_PIXELS, CheckedMapper, ImageFileError,
                     check_image_complete, check_max_image_pixels, open_image_header,
                     read_image_checked)
from .lazy_yaml import DEFAULT_TARGET_PREFIXES, LazyTargetError, check_lazy_yaml
from .output import MANIFEST_NAME, OutputFolder, OutputFolderError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_TARGET_PREFIXES", "MANIFEST_NAME",
    "CheckedMapper", "CheckpointError", "CheckpointMismatchError", "CocoSchemaError",
    "ConfigFileError", "ImageFileError", "ImagePathError", "LazyTargetError", "OutputFolder",
    "OutputFolderError", "SafeDetectionCheckpointer",
    "bbox_problem", "check_image_complete", "check_lazy_yaml", "check_max_image_pixels",
    "image_entry_problem", "load_checkpoint_file", "load_model_weights", "merge_config_file",
    "open_image_header", "read_coco_json", "read_image_checked", "read_yaml_config",
    "resolve_image_path", "safe_load_yaml_file",
]
