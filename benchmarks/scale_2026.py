"""Wall time, CPU time, peak memory and disk of every CLI stage on 2026-shaped data of a chosen size.

Writes a synthetic dataset shaped like ImageCLEFmedical Caption 2026 (full size: 97,000 train,
19,240 valid and 15,000 test images; 2,646 CUIs with Zipf-distributed frequencies, about 4 per
image, each image carrying its modality CUI as the real data does; flat folders, the combined
concepts file and `cui_mapping.csv`), then runs, each as its own process:

    train-all --config configs/scale.toml        (test_resnet in head mode on 40 px images)
    predict --format 2025 --zip                  (the test images)
    validate                                     (the upload zip, by the 2025/2026 checker's rules)
    evaluate                                     (against the test truth)
    ablation                                     (out-of-fold validation figures)

and prints one row per stage: wall seconds, CPU seconds (user + system of the stage's process
tree), peak resident memory of the stage's process (`os.wait4`'s ru_maxrss, which counts the
pages of memory-mapped files it read) and its peak anonymous memory (/proc polling), and the bytes the
stage added to the image cache, the feature cache, the run directory and its outputs. Each
stage's output and its memory over time (polled every 50 ms) are kept in WORK/memory/STAGE.log
and STAGE.tsv, to find where a peak comes from.

    .venv/bin/python benchmarks/scale_2026.py                  # full size (~9 GB of disk for caches)
    .venv/bin/python benchmarks/scale_2026.py --scale 0.25     # a quarter: costs should be ~1/4
    .venv/bin/python benchmarks/scale_2026.py --scale 0.01 --work /tmp/scale  # a smoke test

The dataset is kept in WORK/data (re-used when the same scale and seed wrote it) so stages can be
re-measured; the run directory is always started afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from conceptclef.core.config import IMAGECLEF_MODALITY_CUIS

REPOSITORY = Path(__file__).resolve().parent.parent
FULL_SIZE = {"train": 97_000, "valid": 19_240, "test": 15_000}
FULL_CUIS = 2_646
IMAGE_SIZE = 40
# Modality shares of the images (about those of ROCOv2); DRCO images carry both PET and CT.
MODALITY_SHARES = {"DRCT": 0.32, "DRXR": 0.27, "DRMR": 0.15, "DRUS": 0.12, "DRAN": 0.07, "DRPE": 0.02, "DRCO": 0.05}
MODALITY_COLOURS = {"DRCT": 90, "DRXR": 150, "DRMR": 60, "DRUS": 30, "DRAN": 200, "DRPE": 120, "DRCO": 240}
EXTRA_CONCEPTS_MEAN = 3.0  # beside the modality CUI(s): about 4 CUIs per image
ZIPF_EXPONENT = 1.0
COMBINED_CONCEPTS_FILE = "ImageCLEFmedical_Caption_2026_concepts.csv"


@dataclass(frozen=True)
class StageResult:
    name: str
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_anonymous_bytes: int
    disk_bytes: dict[str, int]
    output: str


def split_sizes(scale: float) -> dict[str, int]:
    """Images per split at `scale` of the 2026 sizes (at least 40 train, 20 valid and 10 test images)."""
    floors = {"train": 40, "valid": 20, "test": 10}
    return {split: max(floors[split], round(count * scale)) for split, count in FULL_SIZE.items()}


def modality_cuis(category: str) -> list[str]:
    if category == "DRCO":
        return IMAGECLEF_MODALITY_CUIS["DRPE"] + IMAGECLEF_MODALITY_CUIS["DRCT"]
    return list(IMAGECLEF_MODALITY_CUIS[category])


def concept_lists(n_images: int, n_cuis: int, rng: np.random.Generator) -> tuple[list[str], list[list[str]]]:
    """Each image's category and CUIs: its modality CUI(s), then Zipf-drawn concepts whose ranking
    differs per modality (three quarters of the draws follow the modality's own order)."""
    categories = list(MODALITY_SHARES)
    shares = np.array(list(MODALITY_SHARES.values()))
    drawn_categories = rng.choice(len(categories), size=n_images, p=shares / shares.sum())
    n_other = n_cuis - len({cui for cuis in IMAGECLEF_MODALITY_CUIS.values() for cui in cuis})
    numbers = rng.choice(np.arange(1_000_000, 5_000_000), size=n_other, replace=False)
    other_cuis = np.array([f"C{number:07d}" for number in numbers])
    weights = 1.0 / np.arange(1, n_other + 1) ** ZIPF_EXPONENT
    weights /= weights.sum()
    orders = [rng.permutation(n_other) for _ in categories]
    counts = rng.poisson(EXTRA_CONCEPTS_MEAN - 1, size=n_images) + 1
    ranks = rng.choice(n_other, size=int(counts.sum()), p=weights)
    own_order = rng.random(ranks.size) < 0.75
    starts = np.concatenate([[0], np.cumsum(counts)])
    lists: list[list[str]] = []
    for image, category_index in enumerate(drawn_categories):
        span = slice(starts[image], starts[image + 1])
        order = orders[category_index]
        chosen = np.where(own_order[span], order[ranks[span]], ranks[span])
        cuis = modality_cuis(categories[category_index]) + [str(cui) for cui in other_cuis[chosen]]
        lists.append(list(dict.fromkeys(cuis)))
    return [categories[index] for index in drawn_categories], lists


def write_dataset(data_dir: Path, scale: float, seed: int) -> dict[str, int]:
    """Write the 2026-shaped dataset (kept when the same scale and seed wrote it); returns split sizes."""
    sizes = split_sizes(scale)
    marker = data_dir / "scale_2026.json"
    wanted = {"scale": scale, "seed": seed, "sizes": sizes, "image_size": IMAGE_SIZE}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return sizes
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_total = sum(sizes.values())
    categories, lists = concept_lists(n_total, FULL_CUIS, rng)
    names: list[tuple[str, str]] = []
    for split, count in sizes.items():
        names.extend((split, f"ImageCLEFmedical_Caption_2026_{split}_{number:06d}") for number in range(1, count + 1))
    grid = np.linspace(0, 1, IMAGE_SIZE, dtype=np.float32)
    for (split, image_id), category in zip(names, categories):
        folder = data_dir / split
        folder.mkdir(exist_ok=True)
        noise = rng.integers(0, 60, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        base = MODALITY_COLOURS[category] * (0.6 + 0.4 * grid[:, None, None])
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{image_id}.jpg", quality=90)
    rows = {split: [] for split in sizes}  # type: dict[str, list[str]]
    for (split, image_id), cuis in zip(names, lists):
        rows[split].append(f"{image_id},{';'.join(cuis)}\n")
    (data_dir / COMBINED_CONCEPTS_FILE).write_text("ID,CUIs\n" + "".join(rows["train"] + rows["valid"]))
    (data_dir / "test_concepts.csv").write_text("ID,CUIs\n" + "".join(rows["test"]))
    used = sorted({cui for cuis in lists for cui in cuis})
    (data_dir / "cui_mapping.csv").write_text("CUI,Canonical name\n" + "".join(f'{cui},"synthetic concept {cui}"\n' for cui in used))
    marker.write_text(json.dumps(wanted))
    return sizes


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def measured_folders(work: Path) -> dict[str, Path]:
    """Where the stages write: the image cache (DATA/.cache without features/), the feature cache, the run, outputs."""
    return {"image cache": work / "data" / ".cache", "features": work / "data" / ".cache" / "features",
            "run": work / "run", "outputs": work / "outputs"}


def disk_usage(work: Path) -> dict[str, int]:
    sizes = {name: folder_bytes(path) if path.exists() else 0 for name, path in measured_folders(work).items()}
    sizes["image cache"] -= sizes["features"]
    return sizes


class AnonymousMemoryPeak:
    """Polls a process's /proc status for its peak anonymous resident memory (RssAnon).

    ru_maxrss also counts the pages of memory-mapped files the process has read (model outputs,
    the image cache): page cache the kernel can drop under pressure. RssAnon is what the process
    cannot give back; the table shows both. Every poll is also kept as (clock time, VmRSS,
    RssAnon) in `samples`, so a stage's memory can be lined up with its log lines afterwards.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s, self.peak_bytes = pid, interval_s, 0
        self.samples: list[tuple[float, int, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._done.is_set():
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                resident, anonymous = (int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon"))
            except (OSError, ValueError, KeyError):
                return
            self.samples.append((time.time(), resident, anonymous))
            self.peak_bytes = max(self.peak_bytes, anonymous)
            self._done.wait(self.interval_s)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak_bytes

    def write(self, path: Path) -> None:
        """The samples as a TSV: clock time (HH:MM:SS.s, as the stage's log lines), resident and anonymous GB."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["time\tresident_gb\tanonymous_gb"]
        for clock, resident, anonymous in self.samples:
            stamp = time.strftime("%H:%M:%S", time.localtime(clock)) + f".{int(clock % 1 * 10)}"
            lines.append(f"{stamp}\t{resident / 1024**3:.3f}\t{anonymous / 1024**3:.3f}")
        path.write_text("\n".join(lines) + "\n")


def run_stage(name: str, arguments: list[str], work: Path) -> StageResult:
    """Run one CLI stage in its own process; its own rusage gives CPU time and peak RSS."""
    before = disk_usage(work)
    command = [sys.executable, str(REPOSITORY / "cli.py"), *arguments]
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPOSITORY) as process:
        assert process.stdout is not None
        anonymous = AnonymousMemoryPeak(process.pid)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        peak_anonymous = anonymous.stop()
    wall = time.perf_counter() - start
    anonymous.write(work / "memory" / f"{name}.tsv")  # the stage's memory over time, beside its log
    (work / "memory" / f"{name}.log").write_text(output)
    if process.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"stage {name} failed with exit code {process.returncode}: {' '.join(command)}")
    after = disk_usage(work)
    return StageResult(
        name=name,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux: KiB
        peak_anonymous_bytes=peak_anonymous,
        disk_bytes={key: after[key] - before[key] for key in after},
        output=output,
    )


def stage_commands(work: Path, config: Path) -> list[tuple[str, list[str]]]:
    data, run, outputs = work / "data", work / "run", work / "outputs"
    submission = outputs / "submission.csv"
    return [
        ("train-all", ["train-all", "--data", str(data), "--out", str(run), "--config", str(config)]),
        ("predict", ["predict", "--run", str(run), "--images", str(data / "test"), "--out", str(submission), "--format", "2025", "--zip"]),
        ("validate", ["validate", str(submission.with_suffix(".zip")), "--images", str(data / "test")]),
        ("evaluate", ["evaluate", str(submission), str(data / "test_concepts.csv")]),
        ("ablation", ["ablation", "--run", str(run), "--out", str(outputs / "ablation")]),
    ]


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:04.1f} s" if minutes else f"{rest:.1f} s"


def format_table(results: list[StageResult]) -> str:
    header = "| stage | wall | CPU | peak RSS (GB) | peak anonymous (GB) | disk written (MB): image cache / features / run / outputs |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for result in results:
        disk = " / ".join(f"{result.disk_bytes[key] / 1024**2:.1f}" for key in ("image cache", "features", "run", "outputs"))
        lines.append(f"| {result.name} | {format_seconds(result.wall_s)} | {format_seconds(result.cpu_s)} | "
                     f"{result.peak_rss_bytes / 1024**3:.2f} | {result.peak_anonymous_bytes / 1024**3:.2f} | {disk} |")
    return "\n".join(lines)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 2026 sizes (1.0 = 97,000/19,240/15,000 images)")
    parser.add_argument("--work", type=Path, default=Path("scale-2026"), help="folder for the data, the run and the outputs")
    parser.add_argument("--config", type=Path, default=REPOSITORY / "configs" / "scale.toml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="", help="comma-separated subset of the stages (default: all, in order)")
    args = parser.parse_args()
    if not 0 < args.scale <= 4:
        parser.error("--scale must be in (0, 4]")
    work = args.work.resolve()
    print(f"scale benchmark, 2026 shape at scale {args.scale:g}: commit {commit()}, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{value:.2f}' for value in os.getloadavg())}", flush=True)
    start = time.perf_counter()
    sizes = write_dataset(work / "data", args.scale, args.seed)
    print(f"dataset {work / 'data'}: {sizes['train']:,} train, {sizes['valid']:,} valid, {sizes['test']:,} test images "
          f"of {IMAGE_SIZE} px ({time.perf_counter() - start:.1f} s to write or reuse)", flush=True)
    wanted = {name.strip() for name in args.stages.split(",") if name.strip()}
    if not wanted or "train-all" in wanted:
        for folder in ("run", "outputs"):
            shutil.rmtree(work / folder, ignore_errors=True)
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    for name, arguments in stage_commands(work, args.config.resolve()):
        if wanted and name not in wanted:
            continue
        result = run_stage(name, arguments, work)
        results.append(result)
        print(f"  {name}: {format_seconds(result.wall_s)}, peak RSS {result.peak_rss_bytes / 1024**3:.2f} GB", flush=True)
        if name in ("validate", "evaluate"):
            print("    " + "\n    ".join(line for line in result.output.strip().splitlines() if line.strip()), flush=True)
    print(format_table(results))
    print(f"load average at the end {' '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
