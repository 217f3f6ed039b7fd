"""Give memory that a finished step freed back to the operating system.

train-all trains the router, the global model and the category models one after the other in one
process. Each network's large temporaries (validation outputs of every epoch, embeddings, label
blocks) are freed when it finishes, but glibc's allocator keeps freed heap pages (its dynamic
mmap threshold rises after the first large frees, so later large arrays come from the heap
rather than from their own mappings), and the process's resident memory grew from network to
network: at full 2026 size train-all peaked above the ensemble stage and one network together.
`malloc_trim(0)` returns those free pages; elsewhere than on glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library when it is glibc (the one with malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def release_freed_memory() -> bool:
    """Collect garbage cycles, then hand the allocator's free pages back; True when trimmed (glibc)."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
