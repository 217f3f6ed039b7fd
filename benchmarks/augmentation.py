"""Benchmark: augmentation of one training batch, image by image in a loader worker or batched on a device.

    .venv/bin/python benchmarks/augmentation.py                # 64 images at 384 px, configs/gpu.toml's ranges
    .venv/bin/python benchmarks/augmentation.py --device cuda  # also the batched path on the GPU

The loader path (torchvision v2 RandomAffine per image, `training.augment.BatchAugmenter`) runs on
one thread, as in one DataLoader worker; the batched path (`DeviceAugmenter`, one
affine_grid/grid_sample) runs where the batch is. Per-worker seconds a batch tell how many
workers keep one GPU fed: at S seconds a batch and G batches/s per GPU, about S x G workers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from conceptclef.core.config import AugmentConfig
from conceptclef.training.augment import BatchAugmenter, DeviceAugmenter


def seconds_per_batch(
    augment: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int, synchronize: Callable[[], None] = lambda: None
) -> float:
    augment(images)  # warm-up (allocations, kernels)
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        augment(images)
    synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="device of the batched path (cpu or cuda)")
    arguments = parser.parse_args()
    config = AugmentConfig(horizontal_flip=True, rotation_degrees=10.0, zoom=0.1, shear_degrees=5.0)
    torch.manual_seed(0)
    size = arguments.image_size
    images = torch.randint(0, 256, (arguments.batch_size, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker
    loader = seconds_per_batch(BatchAugmenter(config), images, arguments.repeats)
    batched_cpu = seconds_per_batch(DeviceAugmenter(config), images, arguments.repeats)
    torch.set_num_threads(threads)
    results = {
        "batch": arguments.batch_size, "image_size": size, "load": round(os.getloadavg()[0], 2),
        "per_image_v2_one_thread_s": round(loader, 4), "batched_grid_sample_one_thread_s": round(batched_cpu, 4),
    }
    if arguments.device != "cpu":
        device = torch.device(arguments.device)
        on_device = images.to(device)
        results[f"batched_grid_sample_{device.type}_s"] = round(
            seconds_per_batch(DeviceAugmenter(config), on_device, arguments.repeats * 10, torch.cuda.synchronize), 5
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
