"""Crash-safe files in a run directory.

Every file is written to a temporary sibling, flushed to disk and renamed over the target, so a
run killed at any moment leaves either the old file or the new one, never half of one. Readers
can therefore trust any file that exists. Files get the mode the umask allows, and the
temporary sibling of a killed writer is removed by the next run (core/partial_files.py).
"""

from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Literal

import numpy as np
import scipy.sparse as sp

from conceptclef.core.partial_files import create_partial


@contextmanager
def atomic_output(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = create_partial(path)
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_output(path, "wb") as stream:
        stream.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path | str) -> Any:
    """Read a run file written by atomic_write_json; a damaged one is a clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: damaged JSON run file: {error.msg}") from error


def atomic_save_arrays(path: Path | str, **arrays: np.ndarray) -> None:
    """Save named numpy arrays (no pickled objects) as one .npz file."""
    with atomic_output(path, "wb") as stream:
        np.savez(stream, **arrays)  # type: ignore[arg-type]  # mypy: a key of **arrays could be savez's `allow_pickle` (bool)


def load_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """Load an .npz written by atomic_save_arrays without allowing pickled objects."""
    with np.load(Path(path), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def map_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by atomic_save_arrays, large ones as read-only memory maps.

    `np.savez` stores each array uncompressed at a fixed offset of the zip, so a (n, V) model
    output can be read in blocks of rows from the page cache instead of copied whole into the
    process: 19,240 x 2,646 float32 validation probabilities are 204 MB per network, and
    out-of-fold outputs of 116,000 images would be 1.2 GB. The file format is unchanged (old runs
    read the same way); a member that is compressed, empty or not a plain numeric array is loaded.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as stream:
        for member in archive.infolist():
            name = member.filename.removesuffix(".npy")
            mapped = _mapped_member(path, stream, member) if member.compress_type == zipfile.ZIP_STORED else None
            if mapped is None:
                with archive.open(member) as source:
                    mapped = np.lib.format.read_array(source, allow_pickle=False)
            arrays[name] = mapped
    return arrays


def _mapped_member(path: Path, stream: IO[bytes], member: zipfile.ZipInfo) -> np.ndarray | None:
    """A memory map of one stored .npy member of a zip, or None when it cannot be mapped."""
    stream.seek(member.header_offset)
    local_header = stream.read(30)
    if local_header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = int.from_bytes(local_header[26:28], "little"), int.from_bytes(local_header[28:30], "little")
    stream.seek(member.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        return None
    if dtype.hasobject or dtype.kind not in "biuf" or int(np.prod(shape)) == 0:
        return None
    order: Literal["C", "F"] = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=stream.tell(), shape=tuple(shape), order=order)


def sparse_arrays(matrix: sp.spmatrix | sp.sparray, binary: bool = False) -> dict[str, np.ndarray]:
    """A CSR matrix as the named arrays a run file stores: data (left out when `binary`: all ones),
    indices, indptr, shape."""
    csr = sp.csr_matrix(matrix)
    arrays = {"indices": csr.indices, "indptr": csr.indptr, "shape": np.array(csr.shape)}
    return arrays if binary else {"data": csr.data, **arrays}


def sparse_from_arrays(arrays: dict[str, np.ndarray]) -> sp.csr_matrix:
    """The CSR matrix `sparse_arrays` stored; a binary one (no data array) holds float32 ones."""
    data = arrays["data"] if "data" in arrays else np.ones(len(arrays["indices"]), np.float32)
    return sp.csr_matrix((data, arrays["indices"], arrays["indptr"]), shape=tuple(int(size) for size in arrays["shape"]))


def atomic_save_sparse(path: Path | str, matrix: sp.spmatrix | sp.sparray, binary: bool = False, **arrays: np.ndarray) -> None:
    """Save a sparse matrix, with other named arrays beside it, as one .npz (see `sparse_arrays`)."""
    atomic_save_arrays(path, **arrays, **sparse_arrays(matrix, binary))


def load_sparse(path: Path | str) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """The matrix `atomic_save_sparse` wrote, and the other arrays of the file."""
    arrays = load_arrays(path)
    others = {name: value for name, value in arrays.items() if name not in ("data", "indices", "indptr", "shape")}
    return sparse_from_arrays(arrays), others
