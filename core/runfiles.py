"""Crash-safe files in a run directory.

Every file is written to a temporary sibling, flushed to disk and renamed over the target, so a
run killed at any moment leaves either the old file or the new one, never half of one. Readers
can therefore trust any file that exists. Files get the mode the umask allows, and the
temporary sibling of a killed writer is removed by the next run (core/partial_files.py).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

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
