"""Loader workers hand batches to the trainer through shared memory (/dev/shm): check there is room.

Eight workers with a prefetch of 2 at batch 64 of 384 px images keep about 450 MB there per
process; Docker gives a container 64 MB by default, and running out ends in a 'Bus error' deep
inside a worker. Checked before training starts, with what to do in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_MEMORY = Path("/dev/shm")
PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker keeps ready


class SharedMemoryError(RuntimeError):
    """Too little shared memory for the configured loader workers."""


def shared_memory_needed(workers: int, batch_bytes: int, processes: int = 1) -> int:
    """Bytes the loader workers of `processes` processes on this machine hold in shared memory at once."""
    return workers * PREFETCH_FACTOR * batch_bytes * processes


def shared_memory_problem(free_bytes: int, workers: int, batch_bytes: int, processes: int = 1) -> str | None:
    """What to do when `free_bytes` cannot hold the workers' batches, or None when it can."""
    needed = shared_memory_needed(workers, batch_bytes, processes)
    if workers == 0 or needed <= free_bytes:
        return None
    mb = 1024 * 1024
    fitting = max(0, free_bytes // max(1, PREFETCH_FACTOR * batch_bytes * processes))
    return (
        f"{SHARED_MEMORY} has {free_bytes // mb} MiB free but {workers} loader workers x {processes} process(es) need about "
        f"{needed // mb} MiB (a 'Bus error' later): start Docker with --shm-size={_suggested_size(needed)} or set "
        f"data.num_workers <= {fitting}"
    )


def free_shared_memory(path: Path = SHARED_MEMORY) -> int | None:
    """Free bytes in the shared-memory filesystem, or None where there is none to check (macOS, Windows)."""
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def check_shared_memory(workers: int, batch_bytes: int, path: Path = SHARED_MEMORY) -> None:
    """Raise SharedMemoryError (one line) when the loader workers of this machine's processes will not fit."""
    if workers == 0 or batch_bytes == 0:
        return
    free = free_shared_memory(path)
    if free is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: the processes of this node share /dev/shm
    problem = shared_memory_problem(free, workers, batch_bytes, processes)
    if problem is not None:
        raise SharedMemoryError(problem)


def _suggested_size(needed: int) -> str:
    """Twice the need, rounded up to whole gigabytes (headroom for validation loaders and rounding)."""
    gigabytes = max(1, -(-2 * needed // (1024**3)))
    return f"{gigabytes}g"
