"""Forward passes without gradients: validation outputs, cached features, predictions, embeddings.

Outputs are assembled by row index, so the same code serves a single process (all rows) and a
distributed run: each rank computes its contiguous shard, `gather_rows` all-gathers the shards
(trimmed to their true sizes) and every rank assembles exactly the N rows in their original order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm import tqdm

from conceptclef.training.distributed import SINGLE, Shard, all_gather_rows

if TYPE_CHECKING:
    from conceptclef.core.config import TrainingConfig

Activation = Literal["softmax", "sigmoid"]


AmpDtype = Literal["auto", "bfloat16", "float16"]


def autocast_dtype(choice: AmpDtype, capability: tuple[int, int] | None) -> torch.dtype:
    """The autocast dtype for `choice` on a GPU of compute `capability` (None: unknown).

    bfloat16 has float32's range, so no loss scaling is needed and no step is ever skipped;
    GPUs before Ampere (capability 8.0) lack fast bfloat16 and use float16 with a GradScaler.
    """
    if choice == "auto":
        return torch.bfloat16 if capability is not None and capability >= (8, 0) else torch.float16
    return torch.bfloat16 if choice == "bfloat16" else torch.float16


@dataclass(frozen=True)
class DeviceSettings:
    """Where and how tensors are computed: AMP and channels_last only ever apply on CUDA."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    amp_dtype: torch.dtype = torch.float16  # the autocast dtype when `amp`

    @classmethod
    def for_device(cls, device: torch.device, amp: bool, channels_last: bool, amp_dtype: AmpDtype = "auto") -> "DeviceSettings":
        on_cuda = device.type == "cuda"
        capability = torch.cuda.get_device_capability(device) if on_cuda and amp else None
        return cls(device=device, amp=amp and on_cuda, channels_last=channels_last and on_cuda, amp_dtype=autocast_dtype(amp_dtype, capability))

    @classmethod
    def for_training(cls, device: torch.device, training: TrainingConfig) -> "DeviceSettings":
        """A network's settings (amp, amp_dtype, channels_last) on `device`: one place, so training,
        prediction and the GPU check run a network with the same autocast dtype."""
        return cls.for_device(device, training.amp, training.channels_last, training.amp_dtype)

    @property
    def scales_loss(self) -> bool:
        """float16 autocast needs a GradScaler (its gradients underflow); bfloat16 does not."""
        return self.amp and self.amp_dtype == torch.float16

    @property
    def pin_memory(self) -> bool:
        """Page-locked loader batches, so the copies to the GPU are asynchronous (`non_blocking`)."""
        return self.device.type == "cuda"

    def describe(self) -> str:
        """E.g. "cuda:0, autocast bfloat16, channels_last" (logged once per network: what the first GPU run must confirm)."""
        parts = [str(self.device), f"autocast {str(self.amp_dtype).removeprefix('torch.')}" if self.amp else "float32"]
        if self.channels_last:
            parts.append("channels_last")
        return ", ".join(parts)

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """A loader batch on the device in the layout the network runs in.

        Loaders hand NHWC pixels as a permuted NCHW view (no copy in the worker): with
        channels_last that view already has the wanted strides; otherwise the copy to contiguous
        NCHW happens here, on the device.
        """
        batch = batch.to(self.device, non_blocking=True)
        if batch.ndim != 4:
            return batch
        return batch.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def autocast(self) -> AbstractContextManager[object]:
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp else nullcontext()


def to_probabilities(logits: torch.Tensor, activation: Activation) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)


def gather_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], shard: Shard = SINGLE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, outputs) of this process; distributed, every rank's parts (one gathered part).

    A collective: every rank calls it, each with at least one row (`distributed.shard_for`).
    """
    if not shard.distributed:
        return parts
    rows = torch.cat([part[0] for part in parts])
    values = torch.cat([part[1] for part in parts])
    return [(all_gather_rows(rows), all_gather_rows(values))]


def assemble(parts: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> np.ndarray:
    """Place each part's rows at their indices: (size, D) float32; every row exactly once."""
    if not parts:
        return np.zeros((size, 0), dtype=np.float32)
    rows = torch.cat([part[0] for part in parts]).numpy()
    if len(rows) != size or len(np.unique(rows)) != size:
        raise RuntimeError(f"outputs cover {len(np.unique(rows))} distinct of {size} rows in {len(rows)} values")
    width = parts[0][1].shape[1]
    result = np.zeros((size, width), dtype=np.float32)
    for part_rows, values in parts:
        result[part_rows.numpy()] = values.numpy()
    return result


@torch.no_grad()
def run_forward(
    forward: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    batches: Iterable,
    size: int,
    settings: DeviceSettings,
    progress: bool = False,
    description: str = "predict",
    shard: Shard = SINGLE,
) -> list[np.ndarray]:
    """Run `forward` over (inputs, targets, rows) batches; one (size, D) array per output of `forward`.

    `batches` must hold this rank's rows of `shard` (see `batches.batch_loader`); distributed,
    every rank returns all `size` rows.
    """
    collected: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for inputs, _, rows in tqdm(batches, desc=description, disable=not progress, leave=False):
        with settings.autocast():
            outputs = forward(settings.inputs(inputs))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if not collected:
            collected = [[] for _ in outputs]
        for bucket, output in zip(collected, outputs):
            bucket.append((rows.cpu(), output.float().cpu()))
    return [assemble(gather_rows(bucket, shard), size) for bucket in collected]
