"""What a frozen backbone computes for the feature store: its identity and the features themselves.

The extractor is identified by the CONTENT of the backbone (every parameter and buffer, hashed),
its architecture name, its pixel mean/std, the device type, AMP and channels_last, and the torch
and timm versions. A different weight file, a random init from another seed, a fine-tuned
backbone or another architecture can therefore never reuse features, and a model loaded from its
checkpoint shares with the run that trained it (head mode keeps the backbone unchanged).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import timm
import torch

from conceptclef.training import distributed
from conceptclef.training.backbones import ImageClassifier
from conceptclef.training.batches import ImageBatches, batch_loader
from conceptclef.training.inference import Activation, DeviceSettings, run_forward, to_probabilities

# Bump when ImageClassifier.features (or its input normalisation) changes what it returns.
FEATURE_VERSION = "pooled-features-v1"


def extractor_identity(network: ImageClassifier, settings: DeviceSettings) -> str:
    """Digest of everything that decides `network.features`: weights, architecture, normalisation, numerics."""
    backbone = network.backbone
    header = {
        "version": FEATURE_VERSION,
        "architecture": str(getattr(backbone, "pretrained_cfg", {}).get("architecture", "")),
        "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
        "pixel_mean": network.pixel_mean.detach().cpu().flatten().tolist(),
        "pixel_std": network.pixel_std.detach().cpu().flatten().tolist(),
        "device": settings.device.type,
        "amp": str(settings.amp_dtype).removeprefix("torch.") if settings.amp else False,  # float16 and bfloat16 differ
        "channels_last": settings.channels_last,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    digest = hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=20)
    for name, tensor in chain(backbone.named_parameters(), backbone.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)  # .data: a memoryview (numpy's stubs give ndarray __buffer__ only from 3.12)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExtractionSettings:
    """How missing features are computed (as the calling model would compute them)."""

    batch_size: int
    device: DeviceSettings
    num_workers: int = 0
    progress: bool = False
    label: str = "features"


def compute_features(network: ImageClassifier, images: Any, extraction: ExtractionSettings) -> np.ndarray:
    """(N, D) float32 pooled features in eval mode; distributed, sharded and all-gathered (a collective)."""
    network.eval()
    shard = distributed.shard_for(len(images))
    loader = batch_loader(
        ImageBatches(images), extraction.batch_size, shuffle=False, num_workers=extraction.num_workers, shard=shard,
        pin_memory=extraction.device.pin_memory,
    )
    (features,) = run_forward(network.features, loader, len(images), extraction.device, extraction.progress, extraction.label, shard)
    return features


@torch.no_grad()
def head_probabilities(
    network: ImageClassifier, features: np.ndarray, activation: Activation, batch_size: int, settings: DeviceSettings
) -> np.ndarray:
    """The head's probabilities for precomputed features, in the batches a full forward pass would use."""
    network.eval()
    outputs = [np.zeros((0, network.num_classes), dtype=np.float32)]
    for start in range(0, len(features), max(1, batch_size)):
        inputs = torch.from_numpy(features[start : start + batch_size]).to(settings.device)
        with settings.autocast():
            logits = network.head(inputs)
        outputs.append(to_probabilities(logits, activation).float().cpu().numpy())
    return np.concatenate(outputs)
