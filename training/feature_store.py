"""Frozen-backbone features computed once and shared by every head-only model (finetune = "head").

With a frozen backbone, the router, the global model and every category model push the same
images through the same pretrained network; at CPU scale those forward passes are nearly the
whole cost of a run. The store keeps the pooled features of each (extractor, image row) pair, so
each image meets each frozen backbone once per process and, with a directory, once per run.

Keys: never wrong before fast.
- The extractor is identified by the CONTENT of the backbone (every parameter and buffer, hashed),
  its architecture name, its pixel mean/std, the device type, AMP and channels_last, and the torch
  and timm versions. A different weight file, a random init from another seed, a fine-tuned
  backbone or another architecture can therefore never reuse features, and a model loaded from
  its checkpoint shares with the run that trained it (head mode keeps the backbone unchanged).
- An image array is identified by its root and the root rows it shows: a memory-mapped file by
  (path, device, inode, size, mtime, offset, shape, dtype) captured when the store first sees that
  mapping, plus a digest of a few sampled rows; a row subset (`pipeline.datasets.SubsetImages`,
  anything with `parent` and `indices`) by its parent's identity and its indices; an in-memory
  array by a hash of its bytes. The image size is part of the shape. Anything else is not shared.
  Not detected: a memmap file rewritten IN PLACE while mapped (data.cache never does that; it
  writes a new file and renames it).

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

import hashlib
import json
import logging
import mmap
import os
import threading
import warnings
import weakref
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import timm
import torch

from conceptclef.core.config import DataConfig
from conceptclef.core.runfiles import atomic_save_arrays, load_arrays
from conceptclef.training import distributed
from conceptclef.training.backbones import ImageClassifier
from conceptclef.training.batches import ImageBatches, batch_loader
from conceptclef.training.inference import Activation, DeviceSettings, run_forward, to_probabilities

log = logging.getLogger("conceptclef")

# Bump when ImageClassifier.features (or its input normalisation) changes what it returns.
FEATURE_VERSION = "pooled-features-v1"
FILE_FORMAT = "conceptclef-features-v1"
DEFAULT_MAX_BYTES = 2 * 1024**3
FEATURES_FOLDER = "features"  # beside the image cache memmap, when no directory is configured
_SAMPLED_ROWS = 8


@runtime_checkable
class RowSubset(Protocol):
    """An image array whose row i is parent[indices[i]] (pipeline.datasets.SubsetImages)."""

    parent: Any
    indices: np.ndarray


@dataclass(frozen=True)
class ImageSource:
    """An image array seen as rows of a root array that can be identified (and indexed)."""

    root: Any  # np.ndarray / np.memmap, indexed with sorted int64 rows
    rows: np.ndarray  # int64: root row of each image row
    identity: str  # digest of everything that decides the root's pixels
    slot: str  # stable file-name part: the memmap path, or the content digest
    home: Path | None  # folder of the memmap file (persistence beside the image cache)


# -- image sources --------------------------------------------------------------------------------
def image_source(images: Any) -> ImageSource | None:
    """The identifiable root behind `images`, or None when it cannot be identified safely."""
    if isinstance(images, RowSubset) and not isinstance(images, np.ndarray):
        parent = image_source(images.parent)
        if parent is None:
            return None
        indices = np.asarray(images.indices, dtype=np.int64)
        if len(indices) != len(images):
            return None
        return replace(parent, rows=parent.rows[indices])
    if isinstance(images, np.memmap):
        return _memmap_source(images) or _array_source(np.asarray(images))
    if isinstance(images, np.ndarray):
        return _array_source(images)
    return None


def _array_source(array: np.ndarray) -> ImageSource:
    """In-memory pixels: identified by their bytes, so equal arrays share and nothing stale is reused."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"array:{array.dtype.str}:{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    identity = digest.hexdigest()
    return ImageSource(array, np.arange(len(array), dtype=np.int64), identity, identity, None)


def _mapping_root(array: np.memmap) -> np.memmap | None:
    """The memmap that owns the file mapping `array` is a view of (None: not file-backed)."""
    root: Any = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or not isinstance(root.base, mmap.mmap) or not root.filename:
        return None
    return root


def _memmap_source(array: np.memmap) -> ImageSource | None:
    """A file-backed array (or a row view of one) as rows of the whole mapped file."""
    root = _mapping_root(array)
    if root is None or not root.flags.c_contiguous or root.ndim != array.ndim or root.ndim < 1:
        return None
    rows = _view_rows(array, root)
    if rows is None:
        return None
    identity = _memmap_identity(root)
    slot = hashlib.blake2b(str(Path(root.filename).resolve()).encode(), digest_size=10).hexdigest()
    return ImageSource(root, rows, identity, slot, Path(root.filename).parent)


def _view_rows(array: np.ndarray, root: np.ndarray) -> np.ndarray | None:
    """Root rows shown by `array` when it selects whole rows of `root` (a slice); else None."""
    if array.dtype != root.dtype or array.shape[1:] != root.shape[1:] or array.strides[1:] != root.strides[1:]:
        return None
    row_bytes = root.strides[0]
    offset = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    if row_bytes <= 0 or offset % row_bytes or array.strides[0] % row_bytes:
        return None
    rows = offset // row_bytes + np.arange(len(array), dtype=np.int64) * (array.strides[0] // row_bytes)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(root)):
        return None
    return rows


_MAPPING_IDENTITIES: dict[int, str] = {}
_MAPPING_LOCK = threading.Lock()


def _memmap_identity(root: np.memmap) -> str:
    """File identity captured the first time this mapping is seen (it keeps the data it mapped then).

    A cache file replaced later (data.cache renames a new file over it) then gets a new identity
    in new mappings, while this mapping keeps describing the pixels it really holds.
    """
    with _MAPPING_LOCK:
        known = _MAPPING_IDENTITIES.get(id(root))
        if known is not None:
            return known
        stat = os.stat(root.filename)
        digest = hashlib.blake2b(digest_size=20)
        description = [
            "memmap", str(Path(root.filename).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
            int(root.offset), list(root.shape), root.dtype.str,
        ]
        digest.update(json.dumps(description).encode())
        for row in np.unique(np.linspace(0, len(root) - 1, _SAMPLED_ROWS).astype(np.int64)) if len(root) else []:
            digest.update(np.ascontiguousarray(root[row]).reshape(-1).view(np.uint8))
        identity = digest.hexdigest()
        _MAPPING_IDENTITIES[id(root)] = identity
        weakref.finalize(root, _MAPPING_IDENTITIES.pop, id(root), None)
        return identity


class _RootRows:
    """Sorted rows of a root array, indexable like an image array (what ImageBatches reads)."""

    def __init__(self, root: Any, rows: np.ndarray) -> None:
        self.root = root
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.root[self.rows[index]]


# -- extractors -----------------------------------------------------------------------------------
def extractor_identity(network: ImageClassifier, settings: DeviceSettings) -> str:
    """Digest of everything that decides `network.features`: weights, architecture, normalisation, numerics."""
    backbone = network.backbone
    header = {
        "version": FEATURE_VERSION,
        "architecture": str(getattr(backbone, "pretrained_cfg", {}).get("architecture", "")),
        "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
        "pixel_mean": network.pixel_mean.detach().cpu().flatten().tolist(),
        "pixel_std": network.pixel_std.detach().cpu().flatten().tolist(),
        "device": settings.device.type,
        "amp": settings.amp,
        "channels_last": settings.channels_last,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    digest = hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=20)
    for name, tensor in chain(backbone.named_parameters(), backbone.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExtractionSettings:
    """How missing features are computed (as the calling model would compute them)."""

    batch_size: int
    device: DeviceSettings
    num_workers: int = 0
    progress: bool = False
    label: str = "features"


def compute_features(network: ImageClassifier, images: Any, extraction: ExtractionSettings) -> np.ndarray:
    """(N, D) float32 pooled features in eval mode; distributed, sharded and all-gathered (a collective)."""
    network.eval()
    shard = distributed.shard_for(len(images))
    loader = batch_loader(ImageBatches(images), extraction.batch_size, shuffle=False, num_workers=extraction.num_workers, shard=shard)
    (features,) = run_forward(network.features, loader, len(images), extraction.device, extraction.progress, extraction.label, shard)
    return features


@torch.no_grad()
def head_probabilities(
    network: ImageClassifier, features: np.ndarray, activation: Activation, batch_size: int, settings: DeviceSettings
) -> np.ndarray:
    """The head's probabilities for precomputed features, in the batches a full forward pass would use."""
    network.eval()
    outputs = [np.zeros((0, network.num_classes), dtype=np.float32)]
    for start in range(0, len(features), max(1, batch_size)):
        inputs = torch.from_numpy(features[start : start + batch_size]).to(settings.device)
        with settings.autocast():
            logits = network.head(inputs)
        outputs.append(to_probabilities(logits, activation).float().cpu().numpy())
    return np.concatenate(outputs)


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


class _MemoryTier:
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
        memory: _MemoryTier | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else None
        self.beside_images = beside_images
        self.retain = retain
        self.memory = memory if memory is not None else _MemoryTier(max_bytes)
        self.rows_computed = 0  # backbone forward rows run by this store (tests, logs)
        self.rows_reused = 0
        self._unwritable: set[Path] = set()

    def features(self, network: ImageClassifier, images: Any, extraction: ExtractionSettings) -> np.ndarray:
        """(len(images), D) float32 backbone features of `images`, computing only rows never seen before.

        A collective under torchrun (every rank calls it with the same images).
        """
        if len(images) == 0:
            return np.zeros((0, network.num_features), dtype=np.float32)
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
            entry.put(missing, compute_features(network, _RootRows(source.root, missing), extraction))
            if path is not None:
                self._write_file(entry, path)
        self._count(extraction.label, len(missing), len(needed) - len(missing))
        self.memory.shrink(keep=key)
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


# -- the process-wide stores ----------------------------------------------------------------------
_PROCESS_MEMORY = _MemoryTier(DEFAULT_MAX_BYTES)
_SHARED: dict[tuple[str, bool, bool], FeatureStore] = {}


def shared_feature_store(directory: str | Path | None = None, beside_images: bool = False, retain: bool = True) -> FeatureStore:
    """The process's store for these disk settings; all of them share one memory (one pass per process)."""
    settings = (str(directory or ""), beside_images, retain)
    if settings not in _SHARED:
        _SHARED[settings] = FeatureStore(directory, beside_images, retain=retain, memory=_PROCESS_MEMORY)
    return _SHARED[settings]


def feature_store_for(data: DataConfig) -> FeatureStore:
    """The store a pipeline stage should give its models (`data.feature_cache`, `data.feature_cache_dir`)."""
    if data.feature_cache == "off":
        return shared_feature_store(retain=False)
    if data.feature_cache == "memory":
        return shared_feature_store()
    return shared_feature_store(data.feature_cache_dir or None, beside_images=not data.feature_cache_dir)
