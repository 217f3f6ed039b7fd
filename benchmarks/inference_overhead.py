"""Benchmark: `predict` throughput against the bare forward passes of the same networks.

What `predict` adds on top of the networks (routing, kNN retrieval, candidate features, the
LightGBM stacker, decisions, writing the submission and the probabilities file) should cost
under 25% of the networks' own forward time. Both are measured in the same run, on the same
images, from a warm image cache, so JPEG decoding is in neither figure. Two comparisons:

- the whole `predict` command (new process: imports, model loading, everything) against every
  network of the run applied separately to every image;
- in one process with the models loaded: the networks as `predict` runs them (head-mode models
  share one frozen-backbone pass) against everything after them (`write_predictions`).

    .venv/bin/python benchmarks/inference_overhead.py --run demo/run --images demo/data/test --images-count 1000

Needs a trained run (`make demo` makes demo/run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from conceptclef.pipeline.image_sets import load_unlabelled_set  # noqa: E402
from conceptclef.pipeline.stages.predict import RunModels, write_predictions  # noqa: E402
from conceptclef.pipeline.stages.stacking import FittedEnsemble  # noqa: E402
from conceptclef.pipeline.run.directory import Manifest, load_run_config  # noqa: E402
from conceptclef.pipeline.run.layout import RunLayout


def replicate_images(source: Path, count: int, target: Path) -> Path:
    """A flat folder of `count` images, cycling through the source folder's files."""
    files = sorted(path for path in source.iterdir() if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise SystemExit(f"{source}: no images")
    target.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        original = files[index % len(files)]
        shutil.copyfile(original, target / f"bench{index:06d}{original.suffix.lower()}")
    return target


def bare_forward_seconds(models: RunModels, images: np.ndarray, batch_size: int) -> tuple[float, dict[str, float]]:
    """Every network of the run applied to every image: uint8 batch -> network(batch), nothing else."""
    networks = {"global": models.global_model.network_}
    if hasattr(models.router, "network_"):  # a single-category run has no router network
        networks = {"router": models.router.network_, **networks}
    networks.update({f"category-{name}": model.network_ for name, model in models.category_models.items()})
    per_network: dict[str, float] = {}
    with torch.inference_mode():
        for name, network in networks.items():
            network.eval()
            started = time.perf_counter()
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
                network(batch)
            per_network[name] = time.perf_counter() - started
    return sum(per_network.values()), per_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("demo/run"))
    parser.add_argument("--images", type=Path, default=Path("demo/data/test"))
    parser.add_argument("--images-count", type=int, default=1000, help="images to predict (the folder's, cycled)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    layout = RunLayout(args.run)
    config = load_run_config(layout)
    manifest = Manifest.load(layout)
    with tempfile.TemporaryDirectory() as scratch:
        folder = replicate_images(args.images, args.images_count, Path(scratch) / "images")
        out = Path(scratch) / "submission.tsv"
        command = [sys.executable, str(REPO / "cli.py"), "-q", "predict", "--run", str(args.run), "--images", str(folder), "--out", str(out)]
        subprocess.run(command, check=True, capture_output=True)  # warm-up: builds the image cache, warms the disk
        models = RunModels.load(layout, manifest, config)
        image_set, _ = load_unlabelled_set(folder, config, layout.cache_dir)
        images = np.asarray(image_set.images)

        bare_total, per_network = bare_forward_seconds(models, images, args.batch_size)
        ensemble = FittedEnsemble.load(layout, config, manifest, models.vocabulary)
        # No backbone features are stored yet: not on disk, and not in this process's memory.
        shutil.rmtree(layout.cache_dir / "features", ignore_errors=True)
        started = time.perf_counter()
        outputs = models.predict(image_set)
        networks_as_run = time.perf_counter() - started
        started = time.perf_counter()
        write_predictions(outputs, models.vocabulary, ensemble, out)
        after_networks = time.perf_counter() - started
        # The timed predict is the real command in a new process with no backbone features
        # stored yet (only the decoded-image cache is warm, as it is for the bare passes).
        shutil.rmtree(layout.cache_dir / "features", ignore_errors=True)
        started = time.perf_counter()
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        predict_total = time.perf_counter() - started
        summary = json.loads(completed.stdout)

    count = len(images)
    print(f"run {args.run}: {count} images of {config.data.image_size} px, {len(per_network)} networks, torch threads {torch.get_num_threads()}")
    for name, seconds in per_network.items():
        print(f"  bare forward {name:<16} {seconds:7.2f} s  {count / seconds:8.1f} img/s")
    print(f"bare forward, all networks     {bare_total:7.2f} s  {count / bare_total:8.1f} img/s")
    print(f"predict (whole command, new process, cold features) {predict_total:7.2f} s  {count / predict_total:8.1f} img/s  (rule {summary['decision_rule']})")
    overhead = (predict_total - bare_total) / bare_total
    print(f"predict cost on top of the bare forward passes: {100 * overhead:+.1f}% (target < +25%)")
    print(f"in one process: networks as predict runs them {networks_as_run:7.2f} s; after them (kNN, stacking, "
          f"decisions, writing) {after_networks:7.2f} s = {100 * after_networks / networks_as_run:+.1f}% on top (target < +25%)")


if __name__ == "__main__":
    main()
