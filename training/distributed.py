"""Data-parallel training under `torchrun`: process group, rank helpers, sharding, gathers.

Nothing here changes a single process. Under `torchrun` (WORLD_SIZE > 1 in the environment) the
first call that needs the group (`rank()`, `world_size()`, `is_main_process()`, any collective)
initialises it from torchrun's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so multi-node launches need nothing more. Backend: NCCL when CUDA is available,
else gloo. Each process uses cuda:LOCAL_RANK.

Rules the training code relies on (see docs/DISTRIBUTED.md):
- evaluation rows are split into contiguous shards of unequal sizes (never padded with
  duplicates as DistributedSampler does), the outputs are all-gathered with their sizes and
  every rank reassembles exactly the N rows in their original order;
- training batches are the single-process global batches, each rank taking its contiguous slice
  (see `batches.RankSlices`), so the global batch stays the configured one;
- only rank 0 writes files; every rank reads them after a `barrier()`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import timm.layers
import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Shard()


def launched() -> bool:
    """True when started by torchrun (or any env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """Index of this process on its node (selects cuda:LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def init_if_launched(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group when launched with WORLD_SIZE > 1; True when a group is (now) active.

    Idempotent, so every entry point may call it. `backend` defaults to NCCL on CUDA machines
    and gloo elsewhere; NCCL needs each process bound to its GPU before the group exists.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return True


def destroy() -> None:
    """Leave the process group (call once at the end of a torchrun entry point)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return init_if_launched()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    """Rank 0: the only process that writes files and logs progress."""
    return rank() == 0


def current_shard() -> Shard:
    return Shard(rank(), world_size())


def shard_for(size: int) -> Shard:
    """The shard evaluating `size` rows: fewer rows than processes are all computed everywhere.

    (A rank with no rows would produce no outputs and could not join the gather.)
    """
    shard = current_shard()
    return shard if size >= shard.world else SINGLE


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0's files are on disk); no-op in a single process."""
    if _active() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `size` items; shares differ by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)  # the first `extra` ranks take one more, like np.array_split
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(size: int, rank: int, world: int) -> np.ndarray:
    """Rank's contiguous row indices: concatenated in rank order they are 0..size-1, each once."""
    start, stop = shard_bounds(size, rank, world)
    return np.arange(start, stop, dtype=np.int64)


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the process's GPU under NCCL, else the CPU."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0, sizes may differ) in rank order, on every rank.

    all_gather needs equal shapes, so each rank pads to the largest size and the padding is cut
    off with the gathered sizes: the result has exactly the sum of the ranks' rows.
    """
    if world_size() == 1:
        return tensor
    device = collective_device()
    local = tensor.detach().to(device).contiguous()
    sizes = _gather_sizes(local.shape[0], device)
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes)]).to(tensor.device)


def _gather_sizes(size: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.int64, device=device))
    return [int(item.item()) for item in sizes]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (in float64, so sums of losses do not lose digits)."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [float(value) for value in total.cpu()]


def broadcast_value(value: float) -> float:
    """Rank 0's value on every rank: decisions (early stopping, LR) must never diverge."""
    if world_size() == 1:
        return value
    carrier = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.broadcast(carrier, src=0)
    return float(carrier.item())


def check_same_on_all_ranks(value: float, what: str) -> None:
    """Raise on every rank when ranks disagree (e.g. one node sees another run directory)."""
    if world_size() == 1:
        return
    values = all_gather_rows(torch.tensor([value], dtype=torch.float64)).tolist()
    if len(set(values)) > 1:
        raise RuntimeError(
            f"{what} differs between ranks ({values}): every node must see the same run directory (shared filesystem)"
        )


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (so all ranks raise together instead of hanging)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def any_rank_rows(flags: np.ndarray) -> np.ndarray:
    """Element-wise OR of a boolean vector over ranks (every rank passes the same length).

    Ranks that must run a sharded forward pass together first agree on which rows it covers.
    """
    flags = np.asarray(flags, dtype=bool)
    if world_size() == 1:
        return flags
    counts = torch.from_numpy(flags.astype(np.int32)).to(collective_device())
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts.cpu().numpy() > 0


def wrap_for_training(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` when distributed (gradients averaged), else `module`.

    Built again whenever the set of trainable parameters changes (layerwise unfreezing): DDP only
    synchronises parameters that required gradients when it was constructed. Buffers are not
    synchronised at every step (rank 0's would overwrite the others' batch-norm statistics);
    `average_buffers` reconciles them after each validation round.
    """
    if world_size() == 1:
        return module
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError("the NCCL backend trains on GPUs only: use device = 'auto' or 'cuda' under torchrun")
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)


def average_buffers(module: nn.Module) -> None:
    """Average the learned floating buffers of training-mode submodules (batch-norm running statistics) over ranks.

    Without SyncBatchNorm each rank tracked statistics of its own slices; averaged, every rank
    evaluates with the same weights and buffers as the checkpoint rank 0 saves. Frozen batch
    norms (eval mode) are left alone, so their pretrained statistics never drift by rounding.
    """
    world = world_size()
    if world == 1:
        return
    device = collective_device()
    for buffer in buffers_to_average(module):
        carrier = buffer.detach().to(device, copy=True)
        dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
        buffer.copy_(carrier.div_(world).to(buffer.device))


def buffers_to_average(module: nn.Module) -> list[torch.Tensor]:
    """The buffers `average_buffers` reconciles: floating, persistent, of submodules in training mode.

    Non-persistent buffers (the network's pixel mean/std) are constants every rank holds alike;
    summed over 3+ ranks and divided, they would drift by a few ulps an epoch.
    """
    chosen: list[torch.Tensor] = []
    for child in module.modules():
        if not child.training:
            continue
        constants = child._non_persistent_buffers_set
        chosen.extend(
            buffer
            for name, buffer in child.named_buffers(recurse=False)
            if buffer.is_floating_point() and name not in constants
        )
    return chosen


class SyncBatchNormSwap:
    """Synchronised batch norm for the duration of a distributed training run on GPUs.

    Batch statistics then come from the whole global batch, as in a single process. Only the
    module objects change (timm's converter also handles BatchNormAct2d); `restore` puts the
    plain batch norms back with the trained values, so checkpoints and prediction never see
    SyncBatchNorm (which refuses CPU tensors while a process group exists).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.originals: dict[str, nn.Module] = {
            name: child
            for name, child in module.named_modules()
            if name and isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
        }
        for name, child in self.originals.items():
            module.set_submodule(name, timm.layers.convert_sync_batchnorm(child))

    def restore(self) -> None:
        for name, original in self.originals.items():
            original.load_state_dict(self.module.get_submodule(name).state_dict())
            self.module.set_submodule(name, original)
        self.originals = {}


def sync_batch_norm_if_useful(module: nn.Module, device: torch.device) -> SyncBatchNormSwap | None:
    """Swap in SyncBatchNorm when distributed on CUDA; None (per-rank statistics) otherwise."""
    if world_size() == 1 or device.type != "cuda":
        return None
    return SyncBatchNormSwap(module)


def device_for_process(device: torch.device) -> torch.device:
    """Under torchrun every process owns cuda:LOCAL_RANK; an explicit other index is overridden."""
    if device.type != "cuda" or not launched():
        return device
    wanted = torch.device("cuda", local_rank())
    if device.index is not None and device.index != wanted.index:
        warnings.warn(f"device {device} ignored under torchrun: this process (LOCAL_RANK) uses {wanted}", RuntimeWarning, stacklevel=2)
    return wanted
