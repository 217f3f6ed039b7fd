"""Freed memory goes back to the OS between the networks train-all trains in one process (issue 18)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conceptclef.core.memory import release_freed_memory
from conceptclef.pipeline.stages import train_all


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and malloc_trim are Linux/glibc")
def test_freed_heap_pages_leave_the_process() -> None:
    blocks = [np.ones(8192) for _ in range(3000)]  # 64 KiB each: below the mmap threshold, on the heap
    pinned = np.ones(8192)  # allocated last: the heap's top stays in use, so free() alone returns nothing
    del blocks
    freed_but_resident = anonymous_bytes()
    assert release_freed_memory() is True
    assert freed_but_resident - anonymous_bytes() > 100 * 1024**2  # ~190 MB freed by Python, given back by the trim
    assert pinned.sum() == 8192


def test_train_all_releases_memory_after_every_network(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(train_all, "train_model", lambda job, *args: events.append(f"train {job}"))
    monkeypatch.setattr(train_all, "release_freed_memory", lambda: events.append("release") or True)
    monkeypatch.setattr(train_all, "barrier", lambda: None)
    train_all._train_in_sequence(["router", "global", "category-CT"], None, None, None, None, Path("."))  # type: ignore[arg-type]
    assert events == ["train router", "release", "train global", "release", "train category-CT", "release"]
