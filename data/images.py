"""Decoding any image the datasets contain into 8-bit RGB, refusing files that are not safe to decode.

Collections such as ROCO and ImageCLEF were scraped from PubMed Central, so they hold grayscale,
palette, CMYK, RGBA and 16-bit files, plus the odd empty or truncated download. Every one of them
either becomes an RGB image or raises ImageReadError naming the file, so one bad file is reported
as such rather than as a numpy error deep inside training. Image sizes are checked from the header
before any pixel is decoded, so a forged 30000x30000 header cannot exhaust memory.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from conceptclef.data.errors import ImageReadError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default MAX_IMAGE_PIXELS (~13k x 13k)
_RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking; with reducing_gap both fast and sharp
# warnings.catch_warnings is not thread-safe; header parsing is cheap, so serialise just that part.
_OPEN_LOCK = threading.Lock()


def readable_image_extensions() -> tuple[str, ...]:
    """File extensions of every format this Pillow build can decode, e.g. .jpg, .png, .tif, .webp, .bmp, .gif.

    Taken from Pillow's plugin registry rather than a fixed list, so test images in any format it
    reads get predictions; identify-only plugins (stubs such as GRIB or HDF5, MPEG) are left out.
    """
    Image.init()
    decodable = {
        name for name, (factory, _) in Image.OPEN.items()
        if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)) and name != "MPEG"
    }
    extensions = {extension.lower() for extension, name in Image.registered_extensions().items() if name in decodable}
    common = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif")  # named first in messages
    return tuple(dict.fromkeys([*(e for e in common if e in extensions), *sorted(extensions)]))


def open_checked(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) after checking it is a non-empty image within the pixel limit.

    Limits above Pillow's Image.MAX_IMAGE_PIXELS also need that raised, as Pillow checks it first.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageReadError(path, f"cannot read image file: {error.strerror or error}") from None
    if size == 0:
        raise ImageReadError(path, "empty image file (0 bytes)")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(path, f"refused: image too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image Pillow can read (wrong extension or damaged file)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"cannot read image header: {error}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise ImageReadError(path, f"refused: {width}x{height} is over the limit of {max_pixels} pixels")
    return image


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """The image as 8-bit RGB. `draft_size` lets JPEG decode at a reduced scale (still >= that size)."""
    path = Path(path)
    image = open_checked(path, max_pixels)
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft(image.mode if image.mode in ("L", "RGB") else None, (draft_size, draft_size))
        image.load()
        return to_rgb(image)
    except ImageReadError:
        raise
    except Exception as error:  # Pillow reports damage through many exception types
        raise ImageReadError(path, f"cannot decode image: {error}") from None
    finally:
        image.close()


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency composited on black; high bit depth scaled by range."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch an image's own value range to 0..255 (16-bit scans rarely use the full range)."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def load_resized_array(path: Path | str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The whole image squashed to (size, size, 3) uint8: no crop, so nothing at the borders is lost."""
    image = load_image(path, max_pixels, draft_size=size)
    try:
        if image.size != (size, size):
            image = image.resize((size, size), _RESAMPLE, reducing_gap=2.0)
        return np.asarray(image, dtype=np.uint8)
    except Exception as error:
        raise ImageReadError(path, f"cannot resize image: {error}") from None
