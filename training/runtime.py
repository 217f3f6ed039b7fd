"""Device choice, seeding and progress display: what makes a run repeatable and quiet when logged.

Every epoch re-seeds all generators from (seed, epoch). That is what makes an interrupted run
that resumes at epoch k finish with exactly the weights of an uninterrupted run: epoch k draws
the same shuffles, augmentations and dropout masks whichever process runs it. The full RNG state
is still saved in checkpoints so anything drawn between epochs is restored too.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

PROGRESS_ENV = "CONCEPTCLEF_PROGRESS"  # "0" hides progress bars even on a terminal


def resolve_device(device: str) -> torch.device:
    """"auto" -> the first CUDA device when one exists, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


def make_repeatable(device: torch.device) -> None:
    """Cheap determinism: cuDNN picks fixed algorithms (CPU kernels are deterministic already)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def progress_enabled() -> bool:
    """Progress bars on a terminal only, unless CONCEPTCLEF_PROGRESS=0."""
    if os.environ.get(PROGRESS_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def capture_rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    numpy_state = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": int(numpy_state[2]),
        "numpy_has_gauss": int(numpy_state[3]),
        "numpy_cached_gauss": float(numpy_state[4]),
        "python_version": int(python_version),
        "python_internal": list(python_internal),
        "python_gauss": python_gauss,
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_position"],
            state["numpy_has_gauss"],
            state["numpy_cached_gauss"],
        )
    )
    random.setstate((state["python_version"], tuple(state["python_internal"]), state["python_gauss"]))
