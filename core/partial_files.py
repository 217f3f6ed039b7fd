"""Temporary `.partial` files that become real files by rename, and the sweep of dead writers' ones.

A file is written to a hidden sibling and renamed over the target when complete (see
core/runfiles.py and data/cache.py). A process killed by SIGKILL (or a cluster time limit) cannot
remove its sibling, and at full scale one image cache is ~12 GB, so every temporary name embeds
the writer's host and pid: a later run removes the ones whose writer is dead, and never the file
of a process still writing (another train-all sharing the image cache, a parallel worker).

Temporary files are created with mode 0600 by `tempfile.mkstemp`; they are given the mode a
plain `open()` would give (0666 minus the umask) so teammates can read runs, caches and
submissions when the umask allows it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
from pathlib import Path

log = logging.getLogger("conceptclef")

SUFFIX = ".partial"
# .<target name>.<host>-<pid>.<random>.partial
_WRITER = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.partial$")


def _host() -> str:
    """The host name reduced to characters that keep the temporary name parseable."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def create_partial(target: Path) -> tuple[int, Path]:
    """A new temporary sibling of `target` (open descriptor, path), owned by this process, umask mode."""
    prefix = f".{target.name}.{_host()}-{os.getpid()}."
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=SUFFIX, dir=target.parent)
    try:
        os.fchmod(handle, default_file_mode())
    except BaseException:
        os.close(handle)
        Path(temporary).unlink(missing_ok=True)
        raise
    return handle, Path(temporary)


def _writer_is_alive(host: str, pid: int) -> bool:
    if host != _host():
        return True  # another machine's process: its liveness cannot be checked from here
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def remove_leftover_partials(folder: Path | str, recursive: bool = True) -> list[Path]:
    """Delete the `.partial` files under `folder` whose writer (same host, pid gone) is dead.

    Files without a writer in their name (older versions) or of another host are left alone, as
    is anything that vanishes or cannot be removed meanwhile: a sweep never fails a run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"**/.*{SUFFIX}" if recursive else f".*{SUFFIX}"
    removed = []
    for path in folder.glob(pattern):
        match = _WRITER.match(path.name)
        if match is None or _writer_is_alive(match["host"], int(match["pid"])):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path)
        log.info("removed %s (%.1f MB), left by a killed process", path, size / 1e6)
    return removed
