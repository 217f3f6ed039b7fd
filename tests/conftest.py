"""Shared fixtures: real radiology images (from pydicom-data, offline) and a small demo dataset.

Real scans exercise what synthetic arrays miss: 16-bit depth, MONOCHROME1 inversion, odd sizes,
ultrasound RGB with burnt-in text. They are written once per session as JPEG/PNG in the modes the
challenge data contains; tests must treat them as read-only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _dicom_pixels(name: str) -> np.ndarray:
    """Pixel array of a pydicom test file, resolved from the installed data packages (never the network)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":  # 0 is white: invert to the usual look
        pixels = pixels.max() - pixels
    return pixels


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    return np.round(255 * (pixels - pixels.min()) / max(np.ptp(pixels), 1)).astype(np.uint8)


@pytest.fixture(scope="session")
def real_radiology_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Name -> file of real scans saved in each mode we must read (L, RGB, P, RGBA, CMYK, I;16)."""
    folder = tmp_path_factory.mktemp("real_radiology")
    ct = _to_uint8(_dicom_pixels("CT_small.dcm"))  # CT, int16 -> 8-bit, 128 x 128
    mr = _dicom_pixels("MR2_UNCR.dcm")[::2, ::2]  # MR, uint16, 512 x 512
    xr = _dicom_pixels("RG1_UNCI.dcm")[::4, ::4]  # CR X-ray (MONOCHROME1), uint16
    us = _dicom_pixels("US1_UNCI.dcm")  # ultrasound, RGB uint8, 480 x 640
    emri = _dicom_pixels("emri_small.dcm")[0]  # MR, uint16, 64 x 64
    files = {
        "ct_gray_jpeg": (Image.fromarray(ct, "L"), "ct.jpg"),
        "xr_gray_png": (Image.fromarray(_to_uint8(xr), "L"), "xr.png"),
        "us_rgb_jpeg": (Image.fromarray(us, "RGB"), "us.jpg"),
        "us_palette_png": (Image.fromarray(us, "RGB").quantize(64), "us_palette.png"),
        "us_rgba_png": (Image.fromarray(np.dstack([us, np.full(us.shape[:2], 128, np.uint8)]), "RGBA"), "us_rgba.png"),
        "us_cmyk_jpeg": (Image.fromarray(us, "RGB").convert("CMYK"), "us_cmyk.jpg"),
        "mr_16bit_png": (Image.fromarray(mr.astype(np.uint16)), "mr16.png"),
        "emri_16bit_png": (Image.fromarray(emri.astype(np.uint16)), "emri16.png"),
    }
    paths = {}
    for name, (image, file_name) in files.items():
        image.save(folder / file_name)
        paths[name] = folder / file_name
    return paths


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (seed 0) shared by the tests that only read it."""
    from conceptclef.data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "DATA"
    make_demo_dataset(out, n_train=140, n_valid=70, n_test=50, seed=0, image_size=64)
    return out


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """Put back the torch thread count a module's fixtures changed (several pin 1 thread for speed).

    A leaked count would make later in-process training differ, in the last float bits, from the
    same training in a subprocess that starts with the default count.
    """
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: two threads on two shared cores can run 50x slower when
    another process is busy. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


IMAGE_FORMATS = (".tif", ".webp", ".bmp", ".gif", ".png", ".jpeg")


def write_real_scans_in_formats(real_radiology_images: dict[str, Path], folder: Path, stem: str = "scan") -> dict[str, Path]:
    """Real scans written once in each format of IMAGE_FORMATS (plus a 16-bit TIFF): suffix -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = ["ct_gray_jpeg", "us_rgb_jpeg", "xr_gray_png", "us_palette_png", "us_rgba_png", "us_cmyk_jpeg"]
    paths = {}
    for suffix, source in zip(IMAGE_FORMATS, sources):
        image = Image.open(real_radiology_images[source])
        if suffix in (".bmp", ".jpeg", ".webp") and image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        path = folder / f"{stem}_{suffix[1:]}{suffix}"
        image.save(path)
        paths[suffix] = path
    deep = folder / f"{stem}_16bit.tiff"
    Image.open(real_radiology_images["mr_16bit_png"]).save(deep)
    paths[".tiff"] = deep
    return paths


@pytest.fixture(scope="session")
def real_radiology_formats(real_radiology_images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Suffix -> a real scan saved in that format (TIFF, WebP, BMP, GIF, PNG, JPEG; .tiff is 16-bit)."""
    return write_real_scans_in_formats(real_radiology_images, tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def device_worker_threads() -> None:
    """The torch threads of one of two `--devices` workers, for a whole module that compares a
    parallel run with a sequential one: 2 threads against 1 reduce float sums in another order, and
    Adam's first steps, which move every weight by about the learning rate whatever the gradient's
    size, can turn that last-bit difference into 0.02 in a network's probabilities. The count is
    put back at the module's end by `_restore_torch_threads`."""
    import torch

    from conceptclef.pipeline.devices.workers import threads_per_worker

    torch.set_num_threads(threads_per_worker(2))
