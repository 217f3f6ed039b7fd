"""One train-all per run directory at a time, and a writable run directory before any work starts.

Two train-all on the same --out would both see a stage as unfinished and both train it; with
different --set values the files left depend on timing. The lock is an `fcntl.flock` on RUN/.lock:
the kernel releases it when its process dies, however it dies, so a killed run never blocks the
next one and no stale-pid guessing is needed. The file also names the holder's pid and host for
the refusal message. It is never deleted (deleting a lock file lets two processes lock two files).

Taking the lock is also the first write into the run directory, so an --out that is a file or lies
in a read-only folder is one clear error before the data are even read. Holding the lock, the run
is the only writer of its directory, so temporary files of killed runs there are removed.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from conceptclef.core.partial_files import create_partial, remove_leftover_partials
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.ranks import is_main_process

LOCK_FILE = ".lock"


def _cannot_write(root: Path, error: OSError) -> RunDirectoryError:
    return RunDirectoryError(f"{root}: cannot write the run directory ({error.strerror}); choose a writable --out")


def _check_writable(root: Path) -> None:
    """Create the run directory and a file in it, as every stage will."""
    if root.exists() and not root.is_dir():
        raise RunDirectoryError(f"{root}: --out is a file, not a run directory; choose a folder (new or a run to resume)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle, probe = create_partial(root / LOCK_FILE)
        os.close(handle)
        probe.unlink()
    except OSError as error:
        raise _cannot_write(root, error) from None


@contextmanager
def run_lock(root: Path | str) -> Iterator[None]:
    """Hold the run directory's lock for the block; refuse at once while another process holds it.

    Under torchrun only rank 0 locks: the other ranks are the same run.
    """
    root = Path(root)
    if not is_main_process():
        yield
        return
    _check_writable(root)
    path = root / LOCK_FILE
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise _cannot_write(root, error) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunDirectoryError(
                f"{root}: another train-all ({holder}) is using this run directory; "
                "wait for it to finish, or use another --out"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        remove_leftover_partials(root)
        yield
    finally:
        os.close(handle)  # releases the flock
