"""Frozen-backbone features computed once and shared by every head-only model (finetune = "head").

With a frozen backbone, the router, the global model and every category model push the same
images through the same pretrained network; at CPU scale those forward passes are nearly the
whole cost of a run. The store keeps the pooled features of each (extractor, image row) pair, so
each image meets each frozen backbone once per process and, with a directory, once per run.

Keys: never wrong before fast. The extractor is identified by the content of its backbone
(training.feature_extraction), an image array by the pixels it holds (training.image_identity),
so a different backbone or different images can never reuse features. The process-wide stores
are in training.feature_registry.

Rows are computed lazily: a category model computes only its subset's rows, the global model
later reuses them and computes the rest. Under torchrun every rank agrees on the missing rows
(their union) and fills them through the usual sharded forward pass and all-gather, so all
ranks hold the same features; only rank 0 writes files.

Memory: an entry holds (rows of its root array, D) float32, allocated lazily by the OS (80,000
images x 1280 features = 410 MB). Entries beyond `max_bytes` (default 2 GiB for the process-wide
store) are dropped least recently used first; the entry in use is always kept.

Disk (`feature_store_for(config.data)`: data.feature_cache = "disk", in data.feature_cache_dir or
a features/ folder beside the image cache): one uncompressed .npz per (extractor, image root)
holding the computed rows only, written atomically after every fill (temporary file, fsync,
rename), so an interrupted run never finds half a file. A damaged file is ignored with a warning
and its rows recomputed; a file of other images or another backbone in the same slot is replaced.
Rows another process wrote meanwhile (parallel workers) are merged in before computing or writing.

Exactness: features are the rows `network.features` returns in eval mode, but possibly computed in
other batches than the calling model would have used; CPU kernels can then differ in the last
bits (measured: identical or within 1e-6 in probabilities).
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from conceptclef.core.runfiles import atomic_save_arrays, load_arrays
from conceptclef.training import distributed
from conceptclef.training.backbones import ImageClassifier
from conceptclef.training.feature_extraction import (
    ExtractionSettings,
    compute_features,
    extractor_identity,
)
from conceptclef.training.image_identity import ConcatenatedRows, ImageSource, RootRows, image_source

log = logging.getLogger("conceptclef")

FILE_FORMAT = "conceptclef-features-v1"
DEFAULT_MAX_BYTES = 2 * 1024**3
FEATURES_FOLDER = "features"  # beside the image cache memmap, when no directory is configured


# -- the store ------------------------------------------------------------------------------------
class _Entry:
    """Features of the rows of one root array under one extractor; `computed` marks the valid rows."""

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size
        self.features: np.ndarray | None = None
        self.computed = np.zeros(size, dtype=bool)
        self.file_stamps: dict[Path, tuple[int, int, int]] = {}  # feature files as last read or written

    @property
    def nbytes(self) -> int:
        return 0 if self.features is None else int(self.features.nbytes)

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        if self.features is None:
            self.features = np.zeros((self.size, values.shape[1]), dtype=np.float32)  # pages stay unmapped until written
        if values.shape[1] != self.features.shape[1]:
            raise ValueError(f"features of width {values.shape[1]} for an entry of width {self.features.shape[1]}")
        self.features[rows] = values
        self.computed[rows] = True


class MemoryTier:
    """Process memory shared by every store facade of this process; least recently used entries go first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def entry(self, key: str, size: int) -> _Entry:
        """The entry of `key`, new and empty when absent (or dropped to make room)."""
        if key not in self.entries:
            self.entries[key] = _Entry(key, size)
        self.entries.move_to_end(key)
        return self.entries[key]

    def shrink(self, keep: str) -> None:
        """Drop old entries until the total fits `max_bytes` (never `keep`, the one in use)."""
        total = sum(entry.nbytes for entry in self.entries.values())
        for key in list(self.entries):
            if total <= self.max_bytes:
                break
            if key != keep:
                total -= self.entries.pop(key).nbytes


class FeatureStore:
    """Frozen-backbone features, computed once per (extractor, image) and optionally kept on disk.

    `directory`: where feature files go (None: none, unless `beside_images`). `beside_images`:
    without a directory, memmapped images keep their features in a `features/` folder beside
    their file (the image cache). `retain=False` keeps nothing (every call computes its rows).
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        beside_images: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retain: bool = True,
        memory: MemoryTier | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else None
        self.beside_images = beside_images
        self.retain = retain
        self.memory = memory if memory is not None else MemoryTier(max_bytes)
        self.rows_computed = 0  # backbone forward rows run by this store (tests, logs)
        self.rows_reused = 0
        self._unwritable: set[Path] = set()

    def features(self, network: ImageClassifier, images: Any, extraction: ExtractionSettings) -> np.ndarray:
        """(len(images), D) float32 backbone features of `images`, computing only rows never seen before.

        A collective under torchrun (every rank calls it with the same images).
        """
        if len(images) == 0:
            return np.zeros((0, network.num_features), dtype=np.float32)
        if isinstance(images, ConcatenatedRows) and not isinstance(images, np.ndarray):
            return np.concatenate([self.features(network, part, extraction) for part in images.parts])
        source = image_source(images) if self.retain else None
        if source is None:
            self.rows_computed += len(images)
            return compute_features(network, images, extraction)
        key = f"{extractor_identity(network, extraction.device)}-{source.identity}"
        entry = self.memory.entry(key, len(source.root))
        path = self.file_for(key, source)
        needed = np.unique(source.rows)
        if path is not None and not entry.computed[needed].all():
            self._read_file(entry, path)  # an earlier run or another process may hold these rows
        missing = needed[distributed.any_rank_rows(~entry.computed[needed])]  # ranks compute the same rows together
        if len(missing):
            entry.put(missing, compute_features(network, RootRows(source.root, missing), extraction))
            if path is not None:
                self._write_file(entry, path)
        self._count(extraction.label, len(missing), len(needed) - len(missing))
        self.memory.shrink(keep=key)
        assert entry.features is not None  # every needed row is computed by now
        return entry.features[source.rows]

    def file_for(self, key: str, source: ImageSource) -> Path | None:
        """The feature file of (extractor, image root); one slot per root, so a rebuilt image cache overwrites it."""
        folder = self.directory or (source.home / FEATURES_FOLDER if self.beside_images and source.home else None)
        if folder is None:
            return None
        return folder / f"features-{key[:16]}-{source.slot[:16]}.npz"

    def _count(self, label: str, computed: int, reused: int) -> None:
        self.rows_computed += computed
        self.rows_reused += reused
        if reused and distributed.is_main_process():
            log.info("%s: reused the backbone features of %d images, computed %d", label, reused, computed)

    def _read_file(self, entry: _Entry, path: Path) -> None:
        """Merge the rows of `path` that `entry` lacks; a file seen unchanged before is not read again."""
        stamp = _file_stamp(path)
        if stamp is None or entry.file_stamps.get(path) == stamp:
            return
        entry.file_stamps[path] = stamp
        try:
            rows, values = _validated(load_arrays(path), entry)
        except _ForeignFile:
            return  # the slot's previous images or backbone: replaced by the next write
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
            warnings.warn(f"{path}: unusable feature file ({type(error).__name__}: {str(error)[:200]}); recomputing", RuntimeWarning, stacklevel=4)
            return
        lacking = ~entry.computed[rows]
        if lacking.any():
            entry.put(rows[lacking], values[lacking])

    def _write_file(self, entry: _Entry, path: Path) -> None:
        """Atomically replace `path` with every row known here (after merging rows another process wrote)."""
        if path.parent in self._unwritable or not distributed.is_main_process() or entry.features is None:
            return
        self._read_file(entry, path)
        rows = np.flatnonzero(entry.computed).astype(np.int64)
        try:
            atomic_save_arrays(
                path,
                format=np.array(FILE_FORMAT),
                key=np.array(entry.key),
                size=np.array(entry.size, dtype=np.int64),
                rows=rows,
                features=entry.features[rows],
            )
        except OSError as error:
            self._unwritable.add(path.parent)
            warnings.warn(f"{path.parent}: cannot write feature files ({error}); features stay in memory", RuntimeWarning, stacklevel=4)
            return
        stamp = _file_stamp(path)
        if stamp is not None:
            entry.file_stamps[path] = stamp


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, None when it does not exist: changes whenever it is replaced."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class _ForeignFile(Exception):
    """A whole feature file, but for other images, another backbone or another format version."""


def _validated(arrays: dict[str, np.ndarray], entry: _Entry) -> tuple[np.ndarray, np.ndarray]:
    """(rows, features) of a feature file that belongs to `entry`; _ForeignFile or ValueError otherwise."""
    if str(arrays["format"]) != FILE_FORMAT or str(arrays["key"]) != entry.key or int(arrays["size"]) != entry.size:
        raise _ForeignFile
    rows, values = arrays["rows"], arrays["features"]
    if rows.ndim != 1 or values.ndim != 2 or len(rows) != len(values) or values.dtype != np.float32:
        raise ValueError("rows and features do not match")
    if len(rows) and (rows.min() < 0 or rows.max() >= entry.size):
        raise ValueError("rows outside the image array")
    return rows.astype(np.int64), values

