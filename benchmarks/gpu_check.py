"""The measuring and parsing half of benchmarks/gpu_check.sh (the first run on a CUDA GPU).

Subcommands (each prints one JSON object, or the report):

    require-cuda                       exit 2 with one line when torch sees no CUDA GPU
    bare-loop --data D --config C      a bare timm forward/backward loop (and forward-only) on the
                                       same cached batches, same backbone, size, batch, autocast
                                       dtype and channels_last as the config's global model (random
                                       init: configs/gpu.toml's EfficientNetV2-S needs no download)
    small-category --data D --config C time of one 50-image category model with min_steps
    report --log L ...                 what the first GPU run must confirm, from the files above

The parsers (`training_rates`, `autocast_settings`, `peak_memory_mib`, `report_lines`) are pure
functions of text, tested on the CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# "concepts global epoch 3/3: loss 0.0123, valid sample_f1 0.5, lr 1e-05, 4.2s (training 2345 images/s)"
_RATE = re.compile(r"(?P<label>\S+ \S+?) epoch (?P<epoch>\d+)/(?P<epochs>\d+): .*\(training (?P<rate>[\d.]+) images/s\)")
# "concepts global: training on cuda:0, autocast bfloat16, channels_last"
_DEVICE = re.compile(r"(?P<label>\S+ \S+?): training on (?P<settings>.+)$")


# configs/gpu.toml at 2026 scale, at its full epoch budgets (early stopping only shortens it):
# 97,000 train / 19,240 valid / 15,000 test images; global 25 epochs, router 12, categories 25
# (together one pass over the training set an epoch), two small categories raised to
# min_steps = 1500 at batch 64; one frozen-feature pass over train + valid for all head warm-ups
# (shared store), a validation pass per epoch, and 3 networks per test image.
TRAIN, VALID, TEST = 97_000, 19_240, 15_000
EPOCHS = {"global": 25, "router": 12, "categories": 25}
TRAINING_IMAGES = sum(EPOCHS.values()) * TRAIN + 2 * 1_500 * 64
FORWARD_IMAGES = (TRAIN + VALID) + sum(EPOCHS.values()) * VALID + 3 * TEST


def gpu_hours(train_rate: float, forward_rate: float, gpus: int = 1, efficiency: float = 0.85) -> float:
    """GPU wall hours of configs/gpu.toml at 2026 scale from training and forward images/s on one GPU.

    With several GPUs, each network spreads over them (torchrun) at `efficiency` (an assumption
    until gpu_check.sh's 2-GPU run measures it); CPU stages (image cache, stacker) are not included.
    """
    seconds = TRAINING_IMAGES / train_rate + FORWARD_IMAGES / forward_rate
    return seconds / (gpus * (efficiency if gpus > 1 else 1.0)) / 3600


def training_rates(log: str) -> dict[str, list[float]]:
    """Training images/s of each fine-tuned network, one value per validation round, from a train-all log.

    Head warm-ups train on cached features (thousands of images/s of no interest here): left out.
    """
    rates: dict[str, list[float]] = {}
    for line in log.splitlines():
        match = _RATE.search(line)
        if match and "head-warmup" not in line:
            rates.setdefault(match["label"], []).append(float(match["rate"]))
    return rates


def steady_rate(values: list[float]) -> float:
    """Median without the first round (cuDNN autotuning, loader start-up), when there are others."""
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def autocast_settings(log: str) -> dict[str, str]:
    """Network -> 'cuda:0, autocast bfloat16, channels_last' as the loop logged it (fine-tuned networks)."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        match = _DEVICE.search(line)
        if match and "head-warmup" not in match["label"]:
            found[match["label"]] = match["settings"].strip()
    return found


def peak_memory_mib(samples: str) -> int:
    """Largest `memory.used` (MiB) in `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms N` output."""
    values = [int(float(token)) for line in samples.splitlines() for token in re.findall(r"\d+(?:\.\d+)?", line)[:1]]
    if not values:
        raise ValueError("no nvidia-smi memory samples")
    return max(values)


def report_lines(
    log: str,
    bare: dict[str, Any],
    predict_seconds: float,
    predict_images: int,
    memory_samples: str,
    small: dict[str, Any] | None = None,
    ddp_log: str | None = None,
    full: dict[str, Any] | None = None,
) -> list[str]:
    """What the first GPU run must confirm, one line each."""
    rates = training_rates(log)
    if not rates:
        raise ValueError("no '(training N images/s)' lines in the train-all log: did training run?")
    lines = []
    settings = autocast_settings(log)
    lines.append(f"autocast: {', '.join(sorted(set(settings.values()))) or 'not logged'}")
    lines.append(f"bare timm loop ({bare['backbone']}, {bare['image_size']} px, batch {bare['batch_size']}, {bare['dtype']}): "
                 f"train {bare['train_images_per_second']:.0f} images/s, forward {bare['forward_images_per_second']:.0f} images/s, "
                 f"peak {bare['peak_memory_mib']} MiB allocated")
    for label in sorted(rates):
        rate = steady_rate(rates[label])
        lines.append(f"train-all {label}: {rate:.0f} images/s training = {rate / bare['train_images_per_second']:.0%} of the bare loop")
    per_image = predict_images / max(predict_seconds, 1e-9)
    networks = 3  # router, global model and one category model per image
    lines.append(
        f"predict: {per_image:.0f} images/s end to end ({predict_images} images in {predict_seconds:.1f} s, process start and "
        f"model loading included); bare forward of {networks} networks: {bare['forward_images_per_second'] / networks:.0f} images/s"
    )
    lines.append(f"peak GPU memory during train-all (nvidia-smi, CUDA context included): {peak_memory_mib(memory_samples)} MiB")
    if small is not None:
        lines.append(
            f"small category: {small['images']} images, {small['steps']} steps (validate_every_steps {small['validate_every_steps']}): "
            f"{small['seconds']:.1f} s ({small['seconds'] / small['steps'] * 1000:.0f} ms a step)"
        )
    if full is not None:
        lines.append(f"bare timm loop ({full['backbone']}, {full['image_size']} px, batch {full['batch_size']}, {full['dtype']}): "
                     f"train {full['train_images_per_second']:.0f} images/s, forward {full['forward_images_per_second']:.0f} images/s, "
                     f"peak {full['peak_memory_mib']} MiB allocated")
        share = min(1.0, steady_rate(rates["concepts global"]) / bare["train_images_per_second"]) if "concepts global" in rates else 1.0
        train_rate = full["train_images_per_second"] * share
        lines.append(
            f"configs/gpu.toml at 2026 scale, full epoch budgets: {gpu_hours(train_rate, full['forward_images_per_second']):.1f} h on 1 GPU, "
            f"{gpu_hours(train_rate, full['forward_images_per_second'], gpus=8):.1f} h on 8 (the loop at {share:.0%} of the bare "
            f"loop as measured above, 85% DDP efficiency assumed)"
        )
    if ddp_log is not None:
        ddp = training_rates(ddp_log)
        for label in sorted(ddp):
            single = steady_rate(rates[label]) if label in rates else None
            gain = f" = {steady_rate(ddp[label]) / single:.2f}x one GPU" if single else ""
            lines.append(f"torchrun 2 GPUs {label}: {steady_rate(ddp[label]):.0f} images/s training{gain}")
    return lines


# -- measurements (CUDA) ----------------------------------------------------------------------------
def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; this check needs one (and a CUDA build of torch)", file=sys.stderr)
        raise SystemExit(2)


def _cached_images(data: Path, size: int, limit: int) -> Any:
    from conceptclef.data.cache import ImageCache
    from conceptclef.data.layout import load_split

    train = load_split(data, "train")
    cache = ImageCache(Path(tempfile.gettempdir()) / "conceptclef-gpu-check-cache")
    return cache.image_array(train.paths[:limit], size, progress=False).array, train


def bare_loop(data: Path, config_path: Path, steps: int, warmup: int) -> dict[str, Any]:
    """timm forward/backward at the global model's settings on pinned uint8 batches of the cached images."""
    import numpy as np
    import timm
    import torch

    from conceptclef.core.config import load_config
    from conceptclef.training.inference import DeviceSettings

    config = load_config(config_path)
    training, size = config.global_model, config.data.image_size
    device = torch.device("cuda")
    settings = DeviceSettings.for_training(device, training)
    images, _ = _cached_images(data, size, training.batch_size * 8)
    batches = [
        torch.from_numpy(np.ascontiguousarray(images[start : start + training.batch_size])).permute(0, 3, 1, 2).pin_memory()
        for start in range(0, len(images) - training.batch_size + 1, training.batch_size)
    ]
    model = timm.create_model(training.backbone, pretrained=False, num_classes=1000).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=settings.scales_loss)
    torch.backends.cudnn.benchmark = True
    targets = torch.randint(0, 1000, (training.batch_size,), device=device)

    def train_step(batch: torch.Tensor) -> None:
        inputs = settings.inputs(batch).float().div_(255.0)
        optimizer.zero_grad(set_to_none=True)
        with settings.autocast():
            logits = model(inputs)
        scaler.scale(torch.nn.functional.cross_entropy(logits.float(), targets)).backward()
        scaler.step(optimizer)
        scaler.update()

    def timed(step: Any, count: int) -> float:
        for index in range(warmup):
            step(batches[index % len(batches)])
        torch.cuda.synchronize()
        started = time.perf_counter()
        for index in range(count):
            step(batches[index % len(batches)])
        torch.cuda.synchronize()
        return count * training.batch_size / (time.perf_counter() - started)

    torch.cuda.reset_peak_memory_stats()
    model.train()
    train_rate = timed(train_step, steps)
    peak = torch.cuda.max_memory_allocated() // 2**20
    model.eval()

    @torch.inference_mode()
    def forward_step(batch: torch.Tensor) -> None:
        with settings.autocast():
            model(settings.inputs(batch).float().div_(255.0))

    forward_rate = timed(forward_step, steps)
    return {
        "backbone": training.backbone, "image_size": size, "batch_size": training.batch_size,
        "dtype": str(settings.amp_dtype).removeprefix("torch.") if settings.amp else "float32",
        "train_images_per_second": train_rate, "forward_images_per_second": forward_rate, "peak_memory_mib": int(peak),
    }


def small_category(data: Path, config_path: Path, min_steps: int, validate_every_steps: int) -> dict[str, Any]:
    """Wall time of one category model of 50 images (one step a pass) with `min_steps`, as train-all runs it."""
    from conceptclef.core.config import load_config
    from conceptclef.data.vocabulary import ConceptVocabulary

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from training_loop import timed_fit

    config = load_config(config_path)
    training = dataclasses.replace(config.category_model, min_steps=min_steps, validate_every_steps=validate_every_steps, epochs=1)
    images, split = _cached_images(data, config.data.image_size, 80)
    vocabulary = ConceptVocabulary.from_concept_lists(split.concept_lists[:80])
    labels = vocabulary.encode(split.concept_lists[:80])
    seconds, history = timed_fit(
        training, images[:50], labels[:50], list(vocabulary.cuis), (images[50:80], labels[50:80]), config.data.num_workers, device="auto"
    )
    return {"images": 50, "steps": min_steps, "validate_every_steps": validate_every_steps, "seconds": seconds, "validations": len(history)}


def main(arguments: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("require-cuda")
    bare = commands.add_parser("bare-loop")
    bare.add_argument("--data", type=Path, required=True)
    bare.add_argument("--config", type=Path, default=REPO / "configs" / "gpu-demo.toml")
    bare.add_argument("--steps", type=int, default=60)
    bare.add_argument("--warmup", type=int, default=10)
    small = commands.add_parser("small-category")
    small.add_argument("--data", type=Path, required=True)
    small.add_argument("--config", type=Path, default=REPO / "configs" / "gpu-demo.toml")
    small.add_argument("--min-steps", type=int, default=1500)
    small.add_argument("--validate-every-steps", type=int, default=100)
    report = commands.add_parser("report")
    report.add_argument("--log", type=Path, required=True, help="train-all's log")
    report.add_argument("--bare", type=Path, required=True, help="bare-loop's JSON")
    report.add_argument("--predict-seconds", type=float, required=True)
    report.add_argument("--predict-images", type=int, required=True)
    report.add_argument("--memory", type=Path, required=True, help="nvidia-smi memory.used samples")
    report.add_argument("--small", type=Path, default=None, help="small-category's JSON")
    report.add_argument("--ddp-log", type=Path, default=None, help="the 2-GPU torchrun train-all log")
    report.add_argument("--bare-full", type=Path, default=None, help="bare-loop's JSON for configs/gpu.toml's backbone")
    options = parser.parse_args(None if arguments is None else list(arguments))
    if options.command == "require-cuda":
        require_cuda()
    elif options.command == "bare-loop":
        require_cuda()
        print(json.dumps(bare_loop(options.data, options.config, options.steps, options.warmup)))
    elif options.command == "small-category":
        require_cuda()
        print(json.dumps(small_category(options.data, options.config, options.min_steps, options.validate_every_steps)))
    else:
        lines = report_lines(
            options.log.read_text(errors="replace"),
            json.loads(options.bare.read_text()),
            options.predict_seconds,
            options.predict_images,
            options.memory.read_text(),
            json.loads(options.small.read_text()) if options.small else None,
            options.ddp_log.read_text(errors="replace") if options.ddp_log else None,
            json.loads(options.bare_full.read_text()) if options.bare_full else None,
        )
        print("\n".join(lines))


if __name__ == "__main__":
    main()
