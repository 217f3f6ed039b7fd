"""Benchmark: the fine-tuning loop's steps/s on the demo, and what a small category costs per epoch.

Two runs of `ConceptModel.fit` (the loop every network uses) on demo images from the image cache:

- finetune: the global model of configs/cpu-finetune.toml (EfficientNet-Lite0, every weight
  trained) for `--epochs` epochs without its head warm-up; prints optimizer steps per second.
- small-category: 50 training images at batch 64 (one optimizer step a pass) with
  `min_steps`, as configs/gpu.toml's category models; prints the seconds per optimizer step and
  per pass. Before the step-based loop every pass started its loaders and wrote resume.pt;
  that per-pass cost is what this run shows.

    .venv/bin/python benchmarks/training_loop.py --data demo/data
    .venv/bin/python benchmarks/training_loop.py --data demo/data --set validate_every_steps=10

`--set KEY=VALUE` changes a [global_model] key of both runs when this version of the code has it
(keys it does not know are reported and ignored, so the same command runs on older commits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from conceptclef.category_models import ConceptModel  # noqa: E402
from conceptclef.core.config import TrainingConfig, load_config  # noqa: E402
from conceptclef.data.cache import ImageCache  # noqa: E402
from conceptclef.data.layout import load_split  # noqa: E402
from conceptclef.data.vocabulary import ConceptVocabulary  # noqa: E402


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs (TOML values; bare words are strings) -> {key: value}."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text
    return values


def with_known_keys(training: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    known = {item.name for item in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        print(f"# not in this version's TrainingConfig (ignored): {', '.join(unknown)}")
    return dataclasses.replace(training, **{key: value for key, value in overrides.items() if key in known})


def timed_fit(
    training: TrainingConfig, images: Any, labels: Any, cuis: list[str], valid: tuple[Any, Any], workers: int, device: str = "cpu"
) -> tuple[float, list[dict]]:
    """Seconds of one ConceptModel.fit in a fresh work directory, and its history."""
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as work:
        model = ConceptModel(training, images.shape[1], device, seed=0, num_workers=workers)
        started = time.perf_counter()
        model.fit(images, labels, cuis, valid[0], valid[1], Path(work) / "model")
        return time.perf_counter() - started, model.history_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "demo" / "data")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu-finetune.toml")
    parser.add_argument("--epochs", type=int, default=2, help="passes of the fine-tuning run")
    parser.add_argument("--min-steps", type=int, default=30, help="optimizer steps of the 50-image category")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the 50-image category")
    parser.add_argument("--only", choices=("finetune", "small-category"), default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    arguments = parser.parse_args()

    config = load_config(arguments.config)
    size = config.data.image_size
    train, valid = load_split(arguments.data, "train"), load_split(arguments.data, "valid")
    cache = ImageCache(Path(tempfile.gettempdir()) / "conceptclef-loop-bench-cache")
    train_images = cache.image_array(train.paths, size, progress=False).array
    valid_images = cache.image_array(valid.paths, size, progress=False).array
    vocabulary = ConceptVocabulary.from_concept_lists(train.concept_lists)
    labels, valid_labels = vocabulary.encode(train.concept_lists), vocabulary.encode(valid.concept_lists)
    cuis = list(vocabulary.cuis)
    overrides = parse_overrides(arguments.overrides)
    base = with_known_keys(dataclasses.replace(config.global_model, head_warmup_epochs=0, early_stopping_patience=0), overrides)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    results: dict[str, Any] = {}

    if arguments.only in (None, "finetune"):
        training = dataclasses.replace(base, epochs=arguments.epochs)
        seconds, history = timed_fit(training, train_images, labels, cuis, (valid_images, valid_labels), 0)
        steps = arguments.epochs * math.ceil(len(train_images) / training.batch_size)
        results["finetune"] = {"images": len(train_images), "steps": steps, "seconds": round(seconds, 2), "steps_per_second": round(steps / seconds, 3)}
        print(f"finetune: {steps} steps in {seconds:.1f} s = {steps / seconds:.2f} steps/s ({len(history)} records)")

    if arguments.only in (None, "small-category"):
        rows = np.arange(50)
        small = np.ascontiguousarray(train_images[rows])
        training = dataclasses.replace(base, batch_size=64, epochs=1, min_steps=arguments.min_steps, warmup_steps=5)
        valid_rows = np.arange(min(30, len(valid_images)))
        seconds, history = timed_fit(
            training, small, labels[rows], cuis, (np.ascontiguousarray(valid_images[valid_rows]), valid_labels[valid_rows]), arguments.workers
        )
        steps = arguments.min_steps
        results["small_category"] = {
            "images": 50, "steps": steps, "records": len(history), "seconds": round(seconds, 2), "seconds_per_step": round(seconds / steps, 3),
        }
        print(f"small category: 50 images, {steps} one-step passes in {seconds:.1f} s = {seconds / steps:.3f} s per pass ({len(history)} validations)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
