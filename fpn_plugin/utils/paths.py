"""
Checks of the paths the command-line entries take, before any work: the output folder
(``--output``) and a folder of images (``--images``). Export and deploy share them.
"""
import os
from typing import List

__all__ = ["IMAGE_EXTENSIONS", "check_output_dir", "list_folder_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def check_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` if needed; raise a ``ValueError`` naming it if it is unusable."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output folder (--output) {output_dir!r} exists and is not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder (--output) {output_dir!r}: {e}") from e
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ValueError(f"output folder (--output) {output_dir!r} is not writable")


def list_folder_images(image_dir: str) -> List[str]:
    """
    Image files directly inside ``image_dir`` (by extension, case-insensitive), sorted by name.

    Raises:
        FileNotFoundError: ``image_dir`` is not a folder.
        ValueError: it holds no image files.
    """
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir!r}")
    files = sorted(
        os.path.join(image_dir, f) for f in os.listdir(image_dir)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(image_dir, f))
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir!r}")
    return files
