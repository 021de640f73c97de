"""
Reading image files that may be hostile or damaged, with errors that name the file.

- A pixel limit read from the header before any pixel is decoded: an image that declares
  12000x12000 would otherwise be decoded into ~430 MB of pixels (and more in the copies
  that follow), whatever its file size. The limit is ``INPUT.MAX_IMAGE_PIXELS`` (default
  89,478,485 = PIL's own decompression-bomb warning threshold; 0 turns it off). PIL's
  process-wide ``Image.MAX_IMAGE_PIXELS`` is raised to it when it is higher, so PIL does not
  refuse what the config allows.
- Truncated data is an error naming the file: PIL's "image file is truncated" carries no
  file name, and the cheap check :func:`check_image_complete` (end-of-image marker of JPEG and
  PNG files) finds truncated files while only headers are read.
- :class:`CheckedMapper` wraps a Detectron2 dataset mapper (training and evaluation loaders)
  with both.
"""
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "CheckedMapper",
    "ImageFileError",
    "check_image_complete",
    "check_max_image_pixels",
    "open_image_header",
    "read_image_checked",
]

# PIL's default Image.MAX_IMAGE_PIXELS (the same in Pillow 9 and 10): ~9459 x 9459.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# EXIF orientations that swap width and height (Detectron2 applies EXIF rotation on read).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
# Bytes at the end of a file searched for the end-of-image marker (trailing data is allowed).
_TAIL_BYTES = 4096


class ImageFileError(ValueError):
    """An image file that is missing, unreadable, truncated or larger than the pixel limit."""


def check_max_image_pixels(value, key: str = "INPUT.MAX_IMAGE_PIXELS") -> int:
    """Return the pixel limit ``value`` if usable (an int >= 0), else raise naming ``key`` (the
    setting's name in the caller's config: YAML by default)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0 (0: no limit), "
                         f"got {value!r}")
    return value


def _let_pil_open(max_pixels: int) -> None:
    # PIL refuses images above twice its own limit at open(); follow a higher configured limit.
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels == 0:
        Image.MAX_IMAGE_PIXELS = None
    elif limit is not None and max_pixels > limit:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image_header(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[int, int]:
    """
    Read an image's size from its header (no pixel is decoded) and enforce the pixel limit.

    Returns:
        (width, height) as Detectron2 will see the image (EXIF rotation applied).

    Raises:
        ImageFileError: missing, unreadable, or more than ``max_pixels`` pixels (0: no limit).
    """
    if not path or not os.path.isfile(path):
        raise ImageFileError(f"image file is missing: {path!r}")
    _let_pil_open(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                try:
                    orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
                except Exception:  # broken EXIF: Detectron2 ignores it too
                    orientation = None
    except Image.DecompressionBombError as e:
        raise ImageFileError(f"image {path!r} is too large to decode safely ({e}); raise "
                             "INPUT.MAX_IMAGE_PIXELS if it is genuine") from e
    except Exception as e:  # PIL raises several types for corrupt files
        raise ImageFileError(f"image file {path!r} is unreadable ({type(e).__name__}: {e})") from e
    if max_pixels and width * height > max_pixels:
        raise ImageFileError(
            f"image {path!r} declares {width}x{height} = {width * height} pixels, more than "
            f"INPUT.MAX_IMAGE_PIXELS={max_pixels}; it was not decoded (raise the limit if the "
            "image is genuine)")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def check_image_complete(path: str) -> None:
    """
    Cheap truncation check of JPEG and PNG files: their end-of-image marker must be near the
    end of the file (other formats pass; their truncation shows when decoded).

    Raises:
        ImageFileError: the file ends before its end-of-image marker.
    """
    with open(path, "rb") as f:
        magic = f.read(8)
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    if magic.startswith(b"\xff\xd8"):
        marker, kind = b"\xff\xd9", "JPEG"
    elif magic.startswith(b"\x89PNG\r\n\x1a\n"):
        marker, kind = b"IEND", "PNG"
    else:
        return
    if marker not in tail:
        raise ImageFileError(f"image file {path!r} is truncated (the {kind} data ends before "
                             "its end-of-image marker)")


def read_image_checked(path: str, image_format: str,
                       max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Detectron2's ``read_image`` after the header check, with decode errors naming the file.

    Returns:
        np.ndarray: (H, W, C) uint8 in ``image_format`` (as ``detectron2.data.detection_utils``).

    Raises:
        ImageFileError: see :func:`open_image_header`; or the data is truncated or corrupt.
    """
    from detectron2.data import detection_utils

    open_image_header(path, max_pixels)
    try:
        return detection_utils.read_image(path, format=image_format)
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, ...
        raise ImageFileError(f"image file {path!r} cannot be decoded "
                             f"({type(e).__name__}: {e})") from e


class CheckedMapper:
    """
    A dataset mapper whose image reads are checked: the header's pixel count against the limit
    before decoding, and any decode error raised as :class:`ImageFileError` naming the file.

    Args:
        mapper (callable): e.g. ``detectron2.data.DatasetMapper(cfg, is_train)``.
        max_pixels (int): the limit (``INPUT.MAX_IMAGE_PIXELS``; 0: none).
    """

    def __init__(self, mapper: Callable[[Dict], Optional[Dict]],
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.mapper = mapper
        self.max_pixels = check_max_image_pixels(max_pixels)

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        path = dataset_dict.get("file_name")
        open_image_header(path, self.max_pixels)
        try:
            return self.mapper(dataset_dict)
        except OSError as e:  # PIL's decode errors ("image file is truncated") name no file
            raise ImageFileError(f"image file {path!r} cannot be decoded "
                                 f"({type(e).__name__}: {e})") from e
