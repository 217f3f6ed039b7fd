"""SIGTERM ends a command like Ctrl-C does: as an exception, so `finally` blocks clean up.

Cluster schedulers and `kill` send SIGTERM, whose default action ends the process at once: a
half-written image cache (~12 GB at full scale) or checkpoint stays behind as a `.partial` file.
Raised as an exception instead, the atomic writers remove their temporary files, and the run
resumes from its last finished file when the command is run again.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM arrived; a BaseException like KeyboardInterrupt, so `except Exception` does not swallow it."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    # A second SIGTERM during the clean-up ends the process the default way.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated("stopped by SIGTERM")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
