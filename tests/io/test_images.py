"""
fpn_plugin.io.images: bit depth and mode are read from the header. A 16-bit PNG (which
Detectron2 would clip to an almost white picture) and an animated GIF are refused naming the
file and the mode; a single-frame GIF is read like any palette image, and the export lists
GIFs among the images of a folder instead of skipping them silently.
"""
import numpy as np
import pytest
from PIL import Image

from fpn_plugin.export import IMAGE_EXTENSIONS, list_folder_images
from fpn_plugin.io import ImageFileError, open_image_header, read_image_checked


def test_16_bit_png_is_refused_by_name(tmp_path):
    path = str(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # what PIL makes of a 16-bit PNG
    with pytest.raises(ImageFileError, match=r"deep\.png.*mode 'I.*16-bit"):
        read_image_checked(path, "BGR")


def test_single_frame_gif_is_read_and_listed(tmp_path):
    path = str(tmp_path / "one.gif")
    Image.fromarray(np.full((6, 5, 3), 200, dtype=np.uint8)).save(path)
    assert open_image_header(path) == (5, 6)
    image = read_image_checked(path, "BGR")
    assert image.shape == (6, 5, 3) and image.dtype == np.uint8
    assert ".gif" in IMAGE_EXTENSIONS
    assert [p.endswith("one.gif") for p in list_folder_images(str(tmp_path))] == [True]


def test_animated_gif_is_refused_by_name(tmp_path):
    path = str(tmp_path / "anim.gif")
    frames = [Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)) for v in (0, 255)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFileError, match=r"anim\.gif.*2 frames"):
        open_image_header(path)
