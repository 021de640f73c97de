"""Images that declare a huge size are refused from the header before any decoding, and
truncated or corrupt image data is an error naming the file (validation, loaders, export)."""
import io

import numpy as np
import pytest
from detectron2.data import detection_utils
from PIL import Image

from fpn_plugin.data.images import (
    CheckedMapper,
    ImageFileError,
    check_max_image_pixels,
    open_image_header,
    read_image_checked,
)
from fpn_plugin.data.validation import check_image_file


def huge_header_jpeg(path, side=12000):
    """A valid 120x120 JPEG whose header claims side x side pixels (a 'decompression bomb')."""
    buf = io.BytesIO()
    Image.new("RGB", (120, 120), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return str(path)


def truncated_image(path, fmt):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, fmt)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded."""
    def refuse(*args, **kwargs):
        pytest.fail("the image was decoded")

    monkeypatch.setattr(detection_utils, "read_image", refuse)


def test_huge_header_is_refused_before_decoding(tmp_path, no_decoding):
    path = huge_header_jpeg(tmp_path / "bomb.jpg")
    with pytest.raises(ImageFileError, match="12000x12000 = 144000000 pixels") as info:
        read_image_checked(path, "BGR")
    assert path in str(info.value) and "INPUT.MAX_IMAGE_PIXELS" in str(info.value)
    reason = check_image_file({"file_name": path, "height": 12000, "width": 12000})
    assert "INPUT.MAX_IMAGE_PIXELS" in reason and path in reason
    mapper = CheckedMapper(lambda d: pytest.fail("mapper reached"), max_pixels=10_000_000)
    with pytest.raises(ImageFileError, match="bomb.jpg"):
        mapper({"file_name": path})


def test_a_higher_limit_lets_pil_open_what_it_would_refuse(tmp_path):
    # 20000 x 20000 = 4e8 pixels: above twice PIL's default, which PIL itself refuses.
    path = huge_header_jpeg(tmp_path / "big.jpg", side=20000)
    with pytest.raises(ImageFileError):
        open_image_header(path)
    assert open_image_header(path, max_pixels=400_000_000) == (20000, 20000)
    assert open_image_header(path, max_pixels=0) == (20000, 20000)  # 0: no limit


@pytest.mark.parametrize("value", [-1, 1.5, "many", True])
def test_pixel_limit_values_are_checked(value):
    with pytest.raises(ValueError, match="INPUT.MAX_IMAGE_PIXELS"):
        check_max_image_pixels(value)


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_image_data_names_the_file(tmp_path, fmt, ext):
    path = truncated_image(tmp_path / f"cut.{ext}", fmt)
    reason = check_image_file({"file_name": path})  # found by the header-only validation
    assert "truncated" in reason and path in reason
    with pytest.raises(ImageFileError, match="cut") as info:
        read_image_checked(path, "BGR")  # export
    assert path in str(info.value)
    mapper = CheckedMapper(lambda d: detection_utils.read_image(d["file_name"], format="BGR"))
    with pytest.raises(ImageFileError) as info:  # training / evaluation loaders
        mapper({"file_name": path})
    assert path in str(info.value) and "truncated" in str(info.value)


def test_complete_images_pass(tmp_path):
    path = tmp_path / "fine.jpg"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path, "JPEG")
    assert check_image_file({"file_name": str(path), "width": 40, "height": 30}) is None
    assert read_image_checked(str(path), "BGR").shape == (30, 40, 3)
