"""One seeding function for train-all and the networks: every generator repeats, any seed works."""

from __future__ import annotations

import random

import numpy as np
import torch

from conceptclef.training.runtime import epoch_seed, seed_everything


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_seed_everything_repeats_python_numpy_and_torch_draws():
    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first
    seed_everything(12)
    assert all(a != b for a, b in zip(draws(), first))


def test_seeds_beyond_numpy_32_bits_are_accepted():
    """numpy's legacy seeding refuses seeds >= 2**32; epoch seeds go up to 2**63."""
    seed = epoch_seed(2**40, 3)
    assert seed >= 2**32
    seed_everything(seed)
    first = draws()
    seed_everything(seed)
    assert draws() == first


def test_cudnn_picks_the_fastest_algorithms_by_default_and_fixed_ones_when_asked(monkeypatch):
    from conceptclef.core.config import TrainingConfig
    from conceptclef.training.runtime import configure_cudnn

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    configure_cudnn(torch.device("cpu"), TrainingConfig().deterministic)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)  # CPU: untouched
    configure_cudnn(torch.device("cuda", 0), TrainingConfig().deterministic)  # only flags: no GPU needed
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    configure_cudnn(torch.device("cuda", 0), deterministic=True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)


def test_keys_added_at_their_defaults_keep_the_fingerprint_of_runs_trained_before_them():
    import dataclasses

    from conceptclef.core.config import TrainingConfig
    from conceptclef.training.estimator import KEYS_FINGERPRINTED_WHEN_SET, fingerprinted_settings

    settings = fingerprinted_settings(TrainingConfig())
    assert not set(KEYS_FINGERPRINTED_WHEN_SET) & set(settings)
    assert fingerprinted_settings(dataclasses.replace(TrainingConfig(), validate_every_steps=100))["validate_every_steps"] == 100
    assert fingerprinted_settings(dataclasses.replace(TrainingConfig(), deterministic=True))["deterministic"] is True
