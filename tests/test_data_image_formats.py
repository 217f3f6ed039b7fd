"""Every image format Pillow reads is an image; anything else in an image folder is named, never dropped silently."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import cli_error, invoke
from conceptclef.data.images import load_resized_array, readable_image_extensions
from conceptclef.data.layout import list_image_folder
from conceptclef.data.submission import write_submission
from conftest import IMAGE_FORMATS


def test_the_common_formats_are_all_readable_extensions() -> None:
    extensions = readable_image_extensions()
    assert set(IMAGE_FORMATS) | {".jpg", ".tiff"} <= set(extensions)
    assert ".txt" not in extensions and ".pdf" not in extensions  # PDF is write-only in Pillow


@pytest.mark.parametrize("suffix", [*IMAGE_FORMATS, ".tiff"])
def test_real_scans_in_each_format_are_listed_and_decoded(real_radiology_formats: dict[str, Path], suffix: str) -> None:
    path = real_radiology_formats[suffix]
    assert Image.open(path).format == {".tif": "TIFF", ".tiff": "TIFF", ".jpeg": "JPEG"}.get(suffix, suffix[1:].upper())
    assert [record.path for record in list_image_folder(path.parent) if record.path == path] == [path]
    array = load_resized_array(path, 64)
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8 and array.std() > 5  # a picture, not a blank


def test_skipped_entries_are_counted_and_named(real_radiology_formats: dict[str, Path], tmp_path: Path, caplog) -> None:
    folder = tmp_path / "test"
    shutil.copytree(real_radiology_formats[".png"].parent, folder)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "DRCT" / "deeper").mkdir(parents=True)
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden system files are the system's, not the user's images
    shutil.copyfile(real_radiology_formats[".png"], folder / ".scan.png")  # a hidden image may be the user's
    with caplog.at_level(logging.WARNING, logger="conceptclef"):
        records = list_image_folder(folder)
    assert len(records) == len(real_radiology_formats)
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder}: skipped 4 entries that are not readable images: "
        f"{folder / '.scan.png'} (hidden file (its name starts with '.')), "
        f"{folder / 'DRCT'} (a folder inside a flat image folder (its images are not read)), "
        f"{folder / 'gone.jpg'} (broken symbolic link), {folder / 'notes.txt'} (.txt: not an image format Pillow reads)"
    ]


def test_validate_flags_a_submission_missing_a_tiff_image(real_radiology_formats: dict[str, Path], tmp_path: Path) -> None:
    folder = real_radiology_formats[".png"].parent
    ids = sorted(path.stem for path in real_radiology_formats.values())
    complete, partial = tmp_path / "complete.tsv", tmp_path / "partial.tsv"
    write_submission(complete, {image_id: ["C0040405"] for image_id in ids})
    write_submission(partial, {image_id: ["C0040405"] for image_id in ids if not image_id.endswith("_tif")})
    assert invoke("validate", complete, "--images", folder).strip() == f"{complete}: valid ({len(ids)} images)"
    message = cli_error("validate", partial, "--images", folder)
    assert message == f"error: {partial}: 1 of {len(ids)} test images are missing: scan_tif"
