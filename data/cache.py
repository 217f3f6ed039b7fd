"""A uint8 memmap of resized images, so every epoch after the first reads pixels instead of JPEGs.

Decoding and resizing a JPEG costs far more than reading 150 kB from a memmap, and the router,
the global model and every per-category model read the same images for many epochs each. One
cache file exists per (list of source files, image size); its metadata records a key made of every
file's (path, size, mtime_ns) and the preprocessing version, and any difference rebuilds it. The
array is written to a temporary file and renamed only when complete (its metadata is removed
first and written last), so a build killed half-way is never mistaken for a cache; the next
build removes such a killed build's temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptclef.core.partial_files import create_partial, remove_leftover_partials
from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.data.errors import DataError, ImageReadError
from conceptclef.data.images import load_resized_array

# Bump when load_resized_array changes its output (filter, colour handling...): old caches rebuild.
PREPROCESSING_VERSION = "rgb-draft-bilinear-rg2-v1"
_FORMAT = "conceptclef-image-cache"


@dataclass(frozen=True)
class CachedImages:
    """Read-only (N, S, S, 3) uint8 images; rows listed in `bad_indices` are zeros (unreadable files)."""

    array: np.ndarray
    bad_indices: list[int] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: Any) -> Any:  # same indexing as the array
        return self.array[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


class ImageCache:
    """Builds and reuses image memmaps under `cache_dir`."""

    def __init__(self, cache_dir: Path | str, workers: int | None = None, version: str = PREPROCESSING_VERSION) -> None:
        self.cache_dir = Path(cache_dir)
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        self.version = version

    def image_array(
        self, paths: Sequence[Path | str], image_size: int, skip_bad: bool = False, progress: bool = True
    ) -> CachedImages:
        """Images of `paths` resized to `image_size`, from the cache when it is still valid.

        Without `skip_bad` the first unreadable image raises ImageReadError; with it, unreadable
        images become zero rows, listed in `bad_indices`, and a warning names the first few.
        """
        files = [Path(path) for path in paths]
        if not files:
            empty = np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
            empty.flags.writeable = False
            return CachedImages(empty)
        # A build killed by SIGKILL cannot remove its (image-cache-sized) temporary file: this one can.
        remove_leftover_partials(self.cache_dir)
        sources = [_source_entry(path) for path in files]
        key = _cache_key(sources, image_size, self.version)
        array_path, meta_path = self._files(files, image_size)
        metadata = _read_metadata(meta_path)
        if (
            metadata is None
            or metadata.get("key") != key
            or not array_path.is_file()
            or (not skip_bad and metadata.get("bad_indices"))
        ):
            metadata = self._build(files, sources, image_size, key, skip_bad, progress, array_path, meta_path)
        array = np.load(array_path, mmap_mode="r")
        if array.shape != (len(files), image_size, image_size, 3) or array.dtype != np.uint8:
            # Only possible if the files were replaced by hand; rebuild rather than return wrong pixels.
            metadata = self._build(files, sources, image_size, key, skip_bad, progress, array_path, meta_path)
            array = np.load(array_path, mmap_mode="r")
        bad = [int(index) for index in metadata.get("bad_indices", [])]
        if bad:
            _warn_bad(bad, metadata.get("bad_reasons", []), len(files))
        return CachedImages(array, bad, array_path)

    def _files(self, paths: list[Path], image_size: int) -> tuple[Path, Path]:
        """One slot per (path list, size): a rebuild replaces the stale array instead of adding one."""
        slot = hashlib.sha256("\n".join(str(path.resolve()) for path in paths).encode()).hexdigest()[:16]
        stem = self.cache_dir / f"images-{slot}-{image_size}px"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def _build(
        self,
        paths: list[Path],
        sources: list[list],
        image_size: int,
        key: str,
        skip_bad: bool,
        progress: bool,
        array_path: Path,
        meta_path: Path,
    ) -> dict:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        check_free_space(self.cache_dir, len(paths) * image_size * image_size * 3, image_size)
        handle, temporary = create_partial(array_path)
        os.close(handle)
        try:
            array = np.lib.format.open_memmap(
                temporary, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size, 3)
            )
            bad, reasons = self._fill(array, paths, image_size, skip_bad, progress)
            array.flush()
            del array
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())
            meta_path.unlink(missing_ok=True)
            os.replace(temporary, array_path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        metadata = {
            "format": _FORMAT,
            "key": key,
            "image_size": image_size,
            "preprocessing_version": self.version,
            "count": len(paths),
            "bad_indices": bad,
            "bad_reasons": reasons[:20],
            "first_source": str(sources[0][0]),
        }
        atomic_write_json(meta_path, metadata)
        return metadata

    def _fill(
        self, array: np.ndarray, paths: list[Path], image_size: int, skip_bad: bool, progress: bool
    ) -> tuple[list[int], list[str]]:
        """Decode into the rows of `array` with a small thread pool (Pillow releases the GIL)."""

        def decode(index: int) -> str | None:
            try:
                array[index] = load_resized_array(paths[index], image_size)
            except ImageReadError as error:
                array[index] = 0
                return str(error)
            return None

        bad: list[int] = []
        reasons: list[str] = []
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            results = pool.map(decode, range(len(paths)), chunksize=1)
            try:
                for index, reason in enumerate(
                    tqdm(results, total=len(paths), disable=not progress, desc="caching images", unit="img")
                ):
                    if reason is not None:
                        bad.append(index)
                        reasons.append(reason)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        if bad and not skip_bad:
            raise _all_unreadable(paths, bad, reasons)
        return bad, reasons


def _all_unreadable(paths: list[Path], bad: list[int], reasons: list[str], shown: int = 10) -> ImageReadError:
    """Every unreadable image of the pass in one error (the first ten and the count), so a folder
    with several broken files costs one rerun, not one per file; the error's path is the first."""
    if len(bad) == 1:
        return ImageReadError(paths[bad[0]], reasons[0].removeprefix(f"{paths[bad[0]]}: "))
    listed = "; ".join(reasons[:shown]) + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")
    return ImageReadError(
        paths[bad[0]],
        f"{len(bad)} of {len(paths)} images are unreadable (fix or remove them, or set data.skip_bad_images = true): {listed}",
    )


def check_free_space(folder: Path, needed: int, image_size: int) -> None:
    """Refuse a cache the disk cannot hold before writing a byte of it: a memmap filling the disk
    fails late, half-way through decoding, and leaves the disk full for everything else."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(
            folder,
            f"the image cache needs {_readable_size(needed)} ({image_size} px images) but only {_readable_size(free)} is free; "
            "free space, set data.cache_dir to a larger disk, or lower data.image_size",
        )


def _readable_size(size: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"


def _source_entry(path: Path) -> list:
    """(path, size, mtime_ns) of a source; a missing file gets -1s so it can still be keyed and skipped."""
    try:
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [str(path.resolve()), -1, -1]


def _cache_key(sources: list[list], image_size: int, version: str) -> str:
    payload = json.dumps({"sources": sources, "image_size": image_size, "version": version}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_metadata(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        metadata = read_json(path)
    except ValueError:
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("format") == _FORMAT else None


def _warn_bad(bad: list[int], reasons: list[str], total: int) -> None:
    shown = "; ".join(reasons[:3])
    warnings.warn(
        f"{len(bad)} of {total} images could not be read and were replaced by zeros (first: {shown})", stacklevel=3
    )
