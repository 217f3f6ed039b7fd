"""Which process of a torchrun launch writes the run's files.

Under torchrun every rank runs the same pipeline on the same data (the networks' training and
prediction are collective); only rank 0 writes pipeline files, and ranks meet at barriers
between stages so that every rank sees the same files when it decides what to do next.
Without torchrun there is one process, it is rank 0 and barriers do nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from conceptclef.training.distributed import barrier, is_main_process, world_size

__all__ = ["barrier", "is_main_process", "main_process_first", "world_size"]


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache); the others run it after, reusing its files."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()
