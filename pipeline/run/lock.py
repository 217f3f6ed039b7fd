"""One train-all per run directory at a time, and a writable run directory before any work starts.

Two train-all on the same --out would both see a stage as unfinished and both train it; with
different --set values the files left depend on timing. The lock is an `fcntl.flock` on RUN/.lock:
the kernel releases it when its process dies, however it dies, so a killed run never blocks the
next one and no stale-pid guessing is needed. The refusal names the holder's pid (from
/proc/locks). The file stays empty and untouched, so a resume changes no file of a finished run,
and it is never deleted (deleting a lock file lets two processes lock two files).

An --out that is a file or lies in a read-only folder is one clear error before the data are even
read (`check_run_directory_writable`). Taking the lock, the run removes the temporary files that
killed runs left in its directory.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from conceptclef.core.partial_files import create_partial, remove_leftover_partials
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.devices.ranks import is_main_process
from conceptclef.pipeline.run.layout import RunLayout



def _cannot_write(root: Path, error: OSError) -> RunDirectoryError:
    return RunDirectoryError(f"{root}: cannot write the run directory ({error.strerror}); choose a writable --out")


def check_run_directory_writable(root: Path | str) -> None:
    """Refuse an --out that is a file or cannot be written, without creating anything.

    Called before the data are read, so a refused start (bad data, bad --out) leaves no run
    directory behind.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirectoryError(f"{root}: --out is a file, not a run directory; choose a folder (new or a run to resume)")
    existing = next(folder for folder in (root, *root.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise RunDirectoryError(f"{root}: {existing} is a file, so the run directory cannot be made; choose another --out")
    try:
        handle, probe = create_partial(existing / RunLayout(root).lock_path.name)
        os.close(handle)
        probe.unlink()
    except OSError as error:
        raise _cannot_write(root, error) from None


def _holder_pid(path: Path) -> int | None:
    """The pid holding the flock on `path`, from /proc/locks (Linux); None when it cannot be told."""
    try:
        inode = path.stat().st_ino
        with open("/proc/locks", encoding="ascii") as locks:
            for line in locks:
                fields = line.split()
                # 1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


@contextmanager
def run_lock(root: Path | str) -> Iterator[None]:
    """Hold the run directory's lock for the block; refuse at once while another process holds it.

    Under torchrun only rank 0 locks: the other ranks are the same run.
    """
    root = Path(root)
    if not is_main_process():
        yield
        return
    check_run_directory_writable(root)
    path = RunLayout(root).lock_path
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise _cannot_write(root, error) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(path)
            raise RunDirectoryError(
                f"{root}: another train-all{f' (pid {holder})' if holder else ''} is using this run directory; "
                "wait for it to finish, or use another --out"
            ) from None
        remove_leftover_partials(root)
        yield
    finally:
        os.close(handle)  # releases the flock
