"""The files of one trained (or training) network in its work directory.

    checkpoint.pt  best weights + everything needed to rebuild the network (what `load` reads)
    resume.pt      latest epoch: weights, optimizer, scheduler, scaler, history, RNG (deleted when finished)
    state.json     finished flag, fingerprint of the job, history, summary (human-readable)
    metrics.csv    one row per epoch

Every file is written atomically, and .pt files hold only tensors and plain Python values so
`torch.load(path, weights_only=True)` reads them without executing pickled code. A file that
fails to load (truncated copy, full disk on another machine) is reported as damaged, never used.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from conceptclef.core.runfiles import atomic_output, atomic_write_json, atomic_write_text, read_json

BEST_FILE = "checkpoint.pt"
RESUME_FILE = "resume.pt"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("epoch", "train_loss", "valid_metric", "lr", "seconds")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be trusted."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_output(path, "wb") as stream:
        torch.save(payload, stream)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a .pt checkpoint safely; damaged or foreign files raise CheckpointError naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - zip, unpickling and EOF errors all mean "damaged"
        raise CheckpointError(f"{path}: damaged checkpoint ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a conceptclef checkpoint (format_version {FORMAT_VERSION})")
    return payload


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}


class RunFiles:
    """Paths and readers/writers of one work directory."""

    def __init__(self, work_dir: Path | str) -> None:
        self.work_dir = Path(work_dir)
        self.best = self.work_dir / BEST_FILE
        self.resume = self.work_dir / RESUME_FILE
        self.state = self.work_dir / STATE_FILE
        self.metrics = self.work_dir / METRICS_FILE

    def read_state(self) -> dict[str, Any] | None:
        """state.json, or None when it is missing or damaged (the run is then not trusted as finished)."""
        if not self.state.is_file():
            return None
        try:
            state = read_json(self.state)
        except (ValueError, OSError):
            return None
        return state if isinstance(state, dict) else None

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state, state)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite the whole CSV from the history, so it always matches the checkpoint it sits beside."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.metrics, buffer.getvalue())

    def clear(self) -> None:
        """Forget a previous job in this directory (before training a different one from scratch)."""
        for path in (self.state, self.resume, self.best, self.metrics):
            path.unlink(missing_ok=True)
