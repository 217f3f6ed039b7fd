"""Run independent jobs in worker processes, one device per worker (`train-all --devices`).

The router, the global model and each per-category model do not depend on one another, so on a
machine with several GPUs they can train at the same time instead of one after the other. Each
worker process owns one device for its whole life and runs one job at a time; jobs go to whichever
worker is free, in the order given (largest first gives a good makespan).

Workers are started with the spawn method: CUDA cannot be used in a forked child. They must not
write any shared file: the caller does all run-directory bookkeeping before and after
`run_on_devices`, and each job writes only inside its own work directory. Every worker, CPU or
GPU, gets cores // workers torch threads (the CPU side of GPU training needs threads too).
Torch and the training package are imported lazily, so a spawned worker imports only what its
jobs need.

A failed job does not stop the others (their finished models stay on disk, so a rerun resumes
with only what is missing); once every job has ended, the failures are raised together, each
named by its job.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar

from conceptclef.core.config import ConfigError

log = logging.getLogger("conceptclef")


class Job(Protocol):
    @property
    def name(self) -> str: ...


JobT = TypeVar("JobT", bound=Job)
Context = Any


class ParallelTrainingError(RuntimeError):
    """One or more jobs failed in their worker processes; the message names each one."""


def parse_devices(text: str) -> list[str]:
    """`--devices`: "auto" (every visible CUDA device) or a comma-separated list such as
    "cuda:0,cuda:1" or "cpu,cpu"; one worker process per entry (an entry may repeat)."""
    refuse_under_torchrun()
    text = text.strip()
    if text.lower() == "auto":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("--devices auto: no CUDA device is visible; name the devices instead (e.g. --devices cpu,cpu)")
        return [f"cuda:{index}" for index in range(count)]
    devices = [item.strip().lower() for item in text.split(",")]
    if not devices or any(not device for device in devices):
        raise ConfigError(f"--devices {text!r}: expected auto or a comma-separated list such as cuda:0,cuda:1 or cpu,cpu")
    check_devices(devices)
    return devices


def check_devices(devices: Sequence[str]) -> None:
    """Every entry is "cpu" or "cuda:N" for a visible N; refused under torchrun."""
    refuse_under_torchrun()
    if not devices:
        raise ConfigError("--devices: no device given")
    import torch

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in devices:
        if device == "cpu":
            continue
        kind, _, index = device.partition(":")
        if kind != "cuda" or not index.isdigit():
            raise ConfigError(f"--devices: unknown device {device!r}; expected cpu, cuda:N (one per worker) or auto")
        if int(index) >= cuda_count:
            visible = f"only {cuda_count} CUDA device(s) are visible" if cuda_count else "CUDA is not available"
            raise ConfigError(f"--devices: {device} requested but {visible}")


def refuse_under_torchrun() -> None:
    from conceptclef.training import distributed

    if distributed.launched():
        raise ConfigError(
            "--devices cannot be used under torchrun: torchrun trains each model on all its processes (DDP), "
            "--devices trains several models at once in one command; use one or the other"
        )


def threads_per_worker(workers: int) -> int:
    """CPU threads each worker may use so that the workers together do not oversubscribe the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


@dataclass(frozen=True)
class JobOutcome:
    name: str
    device: str
    seconds: float


def run_on_devices(
    jobs: Sequence[JobT],
    devices: Sequence[str],
    prepare: Callable[[str], Context],
    work: Callable[[JobT, Context], None],
) -> list[JobOutcome]:
    """Run `work(job, context)` for every job in min(len(devices), len(jobs)) spawned workers.

    `prepare(device)` builds a worker's context (e.g. loads the data) once, before its first job.
    `prepare`, `work` and the jobs are pickled to the workers: module-level functions (or
    functools.partial of them) and plain data only. Jobs are started in the order given.
    """
    if not jobs:
        return []
    check_devices(devices)
    devices = list(devices)[: len(jobs)]  # a worker without a job would only load the data
    threads = threads_per_worker(len(devices))
    context = multiprocessing.get_context("spawn")
    free_devices = context.Queue()
    for number, device in enumerate(devices, start=1):
        free_devices.put((number, device))
    log.info("training %d models on %d workers (%s), %d CPU thread(s) each", len(jobs), len(devices), ", ".join(devices), threads)
    pool = ProcessPoolExecutor(
        max_workers=len(devices),
        mp_context=context,
        initializer=_bind_worker,
        initargs=(free_devices, threads, logging.getLogger().getEffectiveLevel(), prepare),
    )
    try:
        futures: dict[Future, str] = {pool.submit(_run_job, work, job): job.name for job in jobs}
        outcomes, failures = _collect(futures)
        pool.shutdown(wait=True)
    except BaseException:
        # Ctrl-C (or a bug here): a plain shutdown would wait for every queued job to train.
        _stop_workers(pool)
        raise
    finally:
        free_devices.close()
    if failures:
        order = {job.name: index for index, job in enumerate(jobs)}
        failures.sort(key=lambda failure: order[failure[0]])
        finished = ", ".join(outcome.name for outcome in outcomes) or "none"
        raise ParallelTrainingError(
            f"{len(failures)} of {len(jobs)} models failed:\n  " + "\n  ".join(f"{name}: {reason}" for name, reason, _ in failures)
            + f"\nfinished and kept on disk: {finished}; rerun the same command to train only what is missing"
        ) from failures[0][2]
    return outcomes


def _collect(futures: dict[Future, str]) -> tuple[list[JobOutcome], list[tuple[str, str, BaseException]]]:
    """Wait for every job; a failure is logged at once and returned, the other jobs go on."""
    outcomes: list[JobOutcome] = []
    failures: list[tuple[str, str, BaseException]] = []
    for future in as_completed(futures):
        name = futures[future]
        try:
            outcome = future.result()
        except BrokenProcessPool as error:
            failures.append((name, f"not finished: a worker process died ({error}; out of memory?)", error))
            continue
        except Exception as error:  # noqa: BLE001 - reported with the job's name
            failures.append((name, f"{type(error).__name__}: {error}", error))
            log.error("%s failed in its worker: %s: %s", name, type(error).__name__, error)
            continue
        outcomes.append(outcome)
        log.info("%s: trained on %s in %.0f s", outcome.name, outcome.device, outcome.seconds)
    return outcomes, failures


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued jobs and end the running ones (their checkpoints let a rerun resume)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=30)


# -- inside a worker process -------------------------------------------------------------------

_device: str = ""
_prepare: Callable[[str], Context] | None = None
_context: Context = None


def _bind_worker(free_devices: "multiprocessing.queues.Queue[tuple[int, str]]", threads: int, log_level: int, prepare: Callable[[str], Context]) -> None:
    """ProcessPoolExecutor initializer: take a device for this worker's life and set it up."""
    global _device, _prepare
    import torch

    from conceptclef.training.runtime import PROGRESS_ENV

    number, _device = free_devices.get()
    _prepare = prepare
    os.environ[PROGRESS_ENV] = "0"  # N interleaved progress bars are noise
    logging.basicConfig(level=log_level, format=f"%(asctime)s [worker {number} {_device}] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    if _device.startswith("cuda"):
        torch.cuda.set_device(torch.device(_device))


def _run_job(work: Callable[[JobT, Context], None], job: JobT) -> JobOutcome:
    """One job in this worker. The context is built lazily so its errors are reported with a job's name."""
    global _context
    start = time.monotonic()
    if _context is None:
        assert _prepare is not None, "worker was not initialised"
        _context = _prepare(_device)
    log.info("%s: training", job.name)
    work(job, _context)
    return JobOutcome(job.name, _device, time.monotonic() - start)
