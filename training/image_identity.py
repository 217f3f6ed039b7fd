"""Which pixels an image array holds: the identity that lets frozen-backbone features be shared.

An image array is identified by its root and the root rows it shows: a memory-mapped file by
(path, device, inode, size, mtime, offset, shape, dtype) captured when it is first seen, plus a
digest of a few sampled rows; a row subset (`pipeline.image_sets.SubsetImages`, anything with
`parent` and `indices`) by its parent's identity and its indices; an in-memory array by a hash of
its bytes. The image size is part of the shape. Anything else is not identified (never shared).
Not detected: a memmap file rewritten IN PLACE while mapped (data.cache never does that; it
writes a new file and renames it).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

_SAMPLED_ROWS = 8


@runtime_checkable
class RowSubset(Protocol):
    """An image array whose row i is parent[indices[i]] (pipeline.image_sets.SubsetImages)."""

    parent: Any
    indices: np.ndarray

    def __len__(self) -> int: ...


@runtime_checkable
class ConcatenatedRows(Protocol):
    """Image arrays one after the other (pipeline.image_sets.ConcatenatedImages): each part keeps
    its own identity, so features already computed for a part are found again."""

    parts: list[Any]

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ImageSource:
    """An image array seen as rows of a root array that can be identified (and indexed)."""

    root: Any  # np.ndarray / np.memmap, indexed with sorted int64 rows
    rows: np.ndarray  # int64: root row of each image row
    identity: str  # digest of everything that decides the root's pixels
    slot: str  # stable file-name part: the memmap path, or the content digest
    home: Path | None  # folder of the memmap file (persistence beside the image cache)



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
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # .data: a memoryview (numpy's stubs give ndarray __buffer__ only from 3.12)
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
    if root is None or root.filename is None or not root.flags.c_contiguous or root.ndim != array.ndim or root.ndim < 1:
        return None
    rows = _view_rows(array, root)
    if rows is None:
        return None
    identity = _memmap_identity(root, root.filename)
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


def _memmap_identity(root: np.memmap, filename: str) -> str:
    """File identity captured the first time this mapping is seen (it keeps the data it mapped then).

    A cache file replaced later (data.cache renames a new file over it) then gets a new identity
    in new mappings, while this mapping keeps describing the pixels it really holds.
    """
    with _MAPPING_LOCK:
        known = _MAPPING_IDENTITIES.get(id(root))
        if known is not None:
            return known
        stat = os.stat(filename)
        digest = hashlib.blake2b(digest_size=20)
        description = [
            "memmap", str(Path(filename).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
            int(root.offset), list(root.shape), root.dtype.str,
        ]
        digest.update(json.dumps(description).encode())
        for row in np.unique(np.linspace(0, len(root) - 1, _SAMPLED_ROWS).astype(np.int64)) if len(root) else []:
            digest.update(np.ascontiguousarray(root[row]).reshape(-1).view(np.uint8).data)  # .data: a memoryview (numpy's stubs give ndarray __buffer__ only from 3.12)
        identity = digest.hexdigest()
        _MAPPING_IDENTITIES[id(root)] = identity
        weakref.finalize(root, _MAPPING_IDENTITIES.pop, id(root), None)
        return identity


class RootRows:
    """Sorted rows of a root array, indexable like an image array (what ImageBatches reads)."""

    def __init__(self, root: Any, rows: np.ndarray) -> None:
        self.root = root
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.root[self.rows[index]]
