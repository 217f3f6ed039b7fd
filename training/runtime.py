"""Device choice, seeding and progress display: what makes a run repeatable and quiet when logged.

Every epoch re-seeds all generators from (seed, epoch). That is what makes an interrupted run
that resumes at epoch k finish with exactly the weights of an uninterrupted run: epoch k draws
the same shuffles, augmentations and dropout masks whichever process runs it. The full RNG state
is still saved in checkpoints so anything drawn between epochs is restored too.

Distributed, the batch shuffle is drawn from (seed, epoch) alone, identically on every rank
(DistributedSampler's set_epoch semantics), while augmentation and dropout draw from
(seed, epoch, rank): ranks must not apply the same random transforms to their slices. Rank 0
draws exactly what a single process draws.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from conceptclef.training.distributed import device_for_process, is_main_process

PROGRESS_ENV = "CONCEPTCLEF_PROGRESS"  # "0" hides progress bars even on a terminal

log = logging.getLogger("conceptclef")


def resolve_device(device: str) -> torch.device:
    """"auto" -> a CUDA device when one exists, else the CPU; anything else as given.

    Under torchrun the CUDA device is always cuda:LOCAL_RANK (one GPU per process).
    """
    if device == "auto":
        return device_for_process(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device_for_process(resolved)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): the one seeding function, for train-all and every network.

    numpy's global generator takes 32-bit seeds, so larger seeds (epoch seeds reach 2**63) wrap.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


def process_seed(seed: int, rank: int) -> int:
    """The seed of rank's own random draws (augmentation, dropout); rank 0 keeps `seed`."""
    return (seed + rank * 1_000_033) % 2**63


def configure_cudnn(device: torch.device, deterministic: bool = False) -> None:
    """CUDA: cuDNN times its algorithms once for the (fixed) input shape and keeps the fastest, by default.

    `deterministic` (training.deterministic) asks for cuDNN's fixed algorithms instead: reruns are
    then byte-identical on the same GPU and software, at some speed. CPU kernels are deterministic
    already, so nothing changes there.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def report_training_from_scratch(path: Path | str, reason: str) -> None:
    """Say that saved work at `path` is not used and the network trains anew: one logged warning.

    Logged, not raised as a Python warning: nothing the caller can change avoids it, and in the
    log it sits beside the run's other messages (with the worker's prefix under --devices).
    """
    if is_main_process():
        log.warning("%s: %s; training from scratch", path, reason)


def progress_enabled() -> bool:
    """Progress bars on a terminal and on rank 0 only, unless CONCEPTCLEF_PROGRESS=0."""
    if not is_main_process():
        return False
    if os.environ.get(PROGRESS_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def capture_rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # the legacy global generator is always MT19937: its tuple form
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
