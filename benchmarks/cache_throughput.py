"""How much faster an epoch reads from the uint8 image cache than from the JPEG files.

Creates N synthetic JPEGs, then times the same training-style loop (batches of 32 turned into
float tensors) fed by decode+resize from the JPEGs, and fed by the cache memmap.

    .venv/bin/python benchmarks/cache_throughput.py --images 600 --source-size 512 --size 224
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


from conceptclef.data.cache import ImageCache  # noqa: E402
from conceptclef.data.images import load_resized_array  # noqa: E402

BATCH = 32


def make_jpegs(folder: Path, count: int, side: int) -> list[Path]:
    """Noisy gradient images, so JPEG decoding costs what it does on real scans."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    paths = []
    for index in range(count):
        pixels = ramp[None, :, None] + rng.normal(0, 25, (side, side, 1)).astype(np.float32)
        path = folder / f"img{index:05d}.jpg"
        Image.fromarray(np.clip(np.repeat(pixels, 3, axis=2), 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def run_epoch(count: int, batch_of: Callable[[range], np.ndarray]) -> float:
    """Images per second of one pass in batches, ending in a float tensor as a model would take."""
    start = time.perf_counter()
    checksum = 0.0
    for first in range(0, count, BATCH):
        batch = batch_of(range(first, min(first + BATCH, count)))
        tensor = torch.from_numpy(np.array(batch))  # a copy, as a DataLoader makes; the memmap is read-only
        tensor = tensor.permute(0, 3, 1, 2).float().div_(255)
        checksum += float(tensor[:, :, 0, 0].sum())
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        paths = make_jpegs(folder, args.images, args.source_size)

        def from_jpeg(indices: range) -> np.ndarray:
            return np.stack([load_resized_array(paths[index], args.size) for index in indices])

        start = time.perf_counter()
        cached = ImageCache(folder / "cache").image_array(paths, args.size, progress=False)
        build_seconds = time.perf_counter() - start

        def from_cache(indices: range) -> np.ndarray:
            return cached.array[indices.start : indices.stop]

        jpeg_rates = [run_epoch(args.images, from_jpeg) for _ in range(args.epochs)]
        cache_rates = [run_epoch(args.images, from_cache) for _ in range(args.epochs)]

    jpeg, cache = float(np.mean(jpeg_rates)), float(np.mean(cache_rates))
    print(f"{args.images} JPEGs {args.source_size}px -> {args.size}px, {args.epochs} epochs each, batches of {BATCH}")
    print(f"cache build (thread pool): {build_seconds:.2f} s ({args.images / build_seconds:.0f} images/s)")
    print(f"from JPEG : {jpeg:8.0f} images/s  (epochs: {', '.join(f'{r:.0f}' for r in jpeg_rates)})")
    print(f"from cache: {cache:8.0f} images/s  (epochs: {', '.join(f'{r:.0f}' for r in cache_rates)})")
    print(f"speed-up  : {cache / jpeg:8.1f}x")


if __name__ == "__main__":
    main()
