"""Moved to :mod:`fpn_plugin.io.images` (the reading boundary); kept for existing imports."""
from ..io.images import (DEFAULT_MAX_IMAGE_PIXELS, CheckedMapper, ImageFileError,  # noqa: F401
                         check_image_complete, check_max_image_pixels, open_image_header,
                         read_image_checked)

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "CheckedMapper", "ImageFileError", "check_image_complete",
           "check_max_image_pixels", "open_image_header", "read_image_checked"]
