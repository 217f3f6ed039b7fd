"""ImageCache: reuse, invalidation, bad images, and crash safety of the build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import conceptclef.data.cache as cache_module
from conceptclef.data.cache import ImageCache
from conceptclef.data.errors import DataError, ImageReadError


def make_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.full((40, 50, 3), 20 * index % 256, dtype=np.uint8)
        pixels[:5] = 255
        path = folder / f"img{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many images each build decodes (a cache hit decodes none)."""
    calls: list[int] = []
    original = cache_module.load_resized_array

    def counting(path, size):  # noqa: ANN001, ANN202
        calls.append(1)
        return original(path, size)

    monkeypatch.setattr(cache_module, "load_resized_array", counting)
    return calls


def test_build_then_hit_returns_read_only_memmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "img", 5)
    calls = count_builds(monkeypatch)
    cache = ImageCache(tmp_path / "cache")
    first = cache.image_array(paths, 16, progress=False)
    assert first.array.shape == (5, 16, 16, 3) and first.array.dtype == np.uint8 and first.bad_indices == []
    assert isinstance(first.array, np.memmap) and not first.array.flags.writeable
    assert first.array[3, 10, 8, 0] == 60 and first.array[3, 0, 8, 0] == 255  # rows keep the input order
    assert len(calls) == 5
    second = cache.image_array(paths, 16, progress=False)
    assert len(calls) == 5  # no decoding on a hit
    assert np.array_equal(first.array, second.array)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]


def test_rebuild_when_a_source_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "img", 3)
    calls = count_builds(monkeypatch)
    cache = ImageCache(tmp_path / "cache")
    cache.image_array(paths, 16, progress=False)
    Image.fromarray(np.full((40, 50, 3), 250, dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # mtime alone differs from before, so the size/mtime key must notice
    refreshed = cache.image_array(paths, 16, progress=False)
    assert len(calls) == 6 and refreshed.array[1].min() == 250
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # the stale array was replaced, not kept


def test_rebuild_for_another_size_or_preprocessing_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "img", 2)
    calls = count_builds(monkeypatch)
    ImageCache(tmp_path / "cache").image_array(paths, 16, progress=False)
    assert ImageCache(tmp_path / "cache").image_array(paths, 24, progress=False).array.shape == (2, 24, 24, 3)
    assert len(calls) == 4
    ImageCache(tmp_path / "cache", version="other-filter").image_array(paths, 24, progress=False)
    assert len(calls) == 6


def test_bad_image_raises_without_skip_bad(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 4)
    paths[2].write_bytes(b"")
    with pytest.raises(ImageReadError, match="img2.png"):
        ImageCache(tmp_path / "cache").image_array(paths, 16, progress=False)
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob("*.partial"))


def test_skip_bad_zeroes_rows_and_warns_with_count_and_names(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 5)
    paths[1].write_text("not an image")
    paths[3].write_bytes(b"")
    cache = ImageCache(tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"2 of 5 images could not be read.*img1\.png.*img3\.png"):
        result = cache.image_array(paths, 16, skip_bad=True, progress=False)
    assert result.bad_indices == [1, 3]
    assert result.array[1].max() == 0 and result.array[3].max() == 0 and result.array[4].max() > 0
    with pytest.warns(UserWarning, match="2 of 5"):  # a cache hit still reports them
        assert cache.image_array(paths, 16, skip_bad=True, progress=False).bad_indices == [1, 3]
    with pytest.raises(ImageReadError, match="img1.png"):  # a strict caller does not get the zero rows
        cache.image_array(paths, 16, progress=False)


def test_interrupted_build_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "img", 6)
    cache = ImageCache(tmp_path / "cache", workers=1)
    original = cache_module.load_resized_array
    decoded: list[int] = []

    def dies_half_way(path, size):  # noqa: ANN001, ANN202
        if len(decoded) == 3:
            raise KeyboardInterrupt  # like Ctrl-C or a killed worker
        decoded.append(1)
        return original(path, size)

    monkeypatch.setattr(cache_module, "load_resized_array", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.image_array(paths, 16, progress=False)
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob("*.json"))
    # A process killed outright leaves its temporary file behind: it must be ignored, not read.
    (tmp_path / "cache" / ".images-leftover.npy.partial").write_bytes(b"garbage")
    monkeypatch.setattr(cache_module, "load_resized_array", original)
    result = cache.image_array(paths, 16, progress=False)
    assert result.array.shape == (6, 16, 16, 3) and result.array[5, 10, 8, 0] == 100


def test_damaged_metadata_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "img", 2)
    calls = count_builds(monkeypatch)
    cache = ImageCache(tmp_path / "cache")
    cache.image_array(paths, 16, progress=False)
    next((tmp_path / "cache").glob("*.json")).write_text("{not json")
    assert cache.image_array(paths, 16, progress=False).array.shape == (2, 16, 16, 3)
    assert len(calls) == 4


def test_deleted_array_rebuilds(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 2)
    cache = ImageCache(tmp_path / "cache")
    cache.image_array(paths, 16, progress=False)
    next((tmp_path / "cache").glob("*.npy")).unlink()
    assert cache.image_array(paths, 16, progress=False).array[1, 10, 8, 0] == 20


def test_empty_path_list(tmp_path: Path) -> None:
    assert ImageCache(tmp_path / "cache").image_array([], 16, progress=False).array.shape == (0, 16, 16, 3)


def test_several_unreadable_images_are_all_named_in_one_error(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 15)
    for index in range(1, 13):
        paths[index].write_bytes(b"")
    with pytest.raises(ImageReadError) as error:
        ImageCache(tmp_path / "cache").image_array(paths, 16, progress=False)
    message = str(error.value)
    assert error.value.path == paths[1] and "12 of 15 images are unreadable" in message
    assert all(f"img{index}.png" in message for index in range(1, 11)) and "and 2 more" in message
    assert "img11.png" not in message and "data.skip_bad_images" in message


def test_a_cache_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "img", 3)
    free = 2 * 64 * 64 * 3  # room for two 64 px images of the three
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda folder: shutil_usage(free))
    calls = count_builds(monkeypatch)
    with pytest.raises(DataError) as error:
        ImageCache(tmp_path / "cache").image_array(paths, 64, progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'cache'}: the image cache needs 36.9 kB (64 px images) but only 24.6 kB is free; "
        "free space, set data.cache_dir to a larger disk, or lower data.image_size"
    )
    assert not calls and not list((tmp_path / "cache").glob("*.npy*"))


def shutil_usage(free: int) -> "shutil._ntuple_diskusage":
    return shutil._ntuple_diskusage(10 * free, 9 * free, free)
