"""Image decoding: every mode in the challenge data becomes RGB; broken or hostile files are refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptclef.data.errors import ImageReadError
from conceptclef.data.images import load_image, load_resized_array, to_rgb

MODES = {
    "ct_gray_jpeg": "L",
    "xr_gray_png": "L",
    "us_rgb_jpeg": "RGB",
    "us_palette_png": "P",
    "us_rgba_png": "RGBA",
    "us_cmyk_jpeg": "CMYK",
    "mr_16bit_png": "I;16",
    "emri_16bit_png": "I;16",
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_real_scans_in_every_mode_load_as_rgb(real_radiology_images: dict[str, Path], name: str) -> None:
    path = real_radiology_images[name]
    assert Image.open(path).mode == MODES[name]  # the fixture really covers that mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == Image.open(path).size
    pixels = np.asarray(image)
    assert pixels.std() > 5  # an actual picture, not a blank conversion
    array = load_resized_array(path, 96)
    assert array.shape == (96, 96, 3) and array.dtype == np.uint8


def test_16_bit_is_scaled_by_its_own_range(real_radiology_images: dict[str, Path]) -> None:
    pixels = np.asarray(load_image(real_radiology_images["mr_16bit_png"]))
    assert pixels.min() == 0 and pixels.max() == 255  # not clipped at 255 nor shifted down to near-black
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(load_image(tmp_path / "a.png"))
    assert (pixels[:2] == 200).all() and (pixels[2:] == 0).all()


def test_32_bit_integer_and_float_modes() -> None:
    for mode, values in (("I", np.arange(16, dtype=np.int32) * 1000), ("F", np.linspace(-1, 1, 16, dtype=np.float32))):
        image = to_rgb(Image.fromarray(values.reshape(4, 4), mode))
        pixels = np.asarray(image)
        assert image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255


def test_resize_keeps_the_whole_image(tmp_path: Path) -> None:
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # a stripe at the left border must survive (no centre crop)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    array = load_resized_array(tmp_path / "wide.png", 30)
    assert array.shape == (30, 30, 3) and array[:, 0].min() > 200 and array[:, -1].max() < 20


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg: empty image file"):
        load_image(tmp_path / "empty.jpg")


def test_text_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "page.jpg").write_text("<html>404 Not Found</html>")
    with pytest.raises(ImageReadError, match="page.jpg: not an image"):
        load_image(tmp_path / "page.jpg")


def test_truncated_jpeg_and_png(real_radiology_images: dict[str, Path], tmp_path: Path) -> None:
    for name, suffix in (("ct_gray_jpeg", ".jpg"), ("xr_gray_png", ".png")):
        data = real_radiology_images[name].read_bytes()
        broken = tmp_path / f"truncated{suffix}"
        broken.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError) as error:
            load_resized_array(broken, 32)
        assert error.value.path == broken


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge size over a few bytes of pixel data: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [14_000, 30_000])
def test_oversized_header_is_refused_before_decoding(tmp_path: Path, side: int) -> None:
    # 14000^2 trips Pillow's warning band, 30000^2 its error band: both must be ImageReadError.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageReadError, match="bomb.png: refused"):
        load_image(path)


def test_pixel_limit_is_configurable(real_radiology_images: dict[str, Path]) -> None:
    with pytest.raises(ImageReadError, match="over the limit of 1000 pixels"):
        load_image(real_radiology_images["ct_gray_jpeg"], max_pixels=1000)
