"""The config object: TOML in, frozen dataclasses out, bad files refused with file and line."""

from pathlib import Path

import pytest

from conceptclef.core.config import Config, ConfigError, apply_overrides, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_when_no_file():
    assert load_config(None) == Config()


def test_sections_and_nested_tables_are_read(tmp_path):
    path = write(
        tmp_path,
        "seed = 7\n[data]\nimage_size = 96\n[router]\nepochs = 2\nlearning_rate = 1\n[router.augment]\nzoom = 0.2\n",
    )
    config = load_config(path)
    assert config.seed == 7
    assert config.data.image_size == 96
    assert config.router.epochs == 2
    assert config.router.learning_rate == 1.0 and isinstance(config.router.learning_rate, float)
    assert config.router.augment.zoom == 0.2
    assert config.global_model.epochs == Config().global_model.epochs


def test_unknown_key_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed = 1\n[data]\nimage_size = 64\nimgae_size = 65\n")
    with pytest.raises(ConfigError, match=r"run\.toml:4: unknown key 'data\.imgae_size'"):
        load_config(path)


def test_wrong_type_names_file_and_line(tmp_path):
    path = write(tmp_path, "[router]\nbatch_size = 'big'\n")
    with pytest.raises(ConfigError, match=r"run\.toml:2: router\.batch_size must be an integer"):
        load_config(path)


def test_bool_is_not_accepted_as_a_number(tmp_path):
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(write(tmp_path, "seed = true\n"))


def test_choice_outside_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r":2: global_model\.loss = 'focal' is not one of"):
        load_config(write(tmp_path, "[global_model]\nloss = 'focal'\n"))


def test_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.toml: not valid TOML"):
        load_config(write(tmp_path, "[data\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_saved_config_reads_back_identical(tmp_path):
    config = load_config(write(tmp_path, "seed = 3\n[ensemble]\nfolds = 4\n"))
    save_config(config, tmp_path / "resolved.toml")
    assert load_config(tmp_path / "resolved.toml") == config


def test_overrides_apply_with_types_checked():
    config = apply_overrides(Config(), ["router.epochs=4", "device=cpu", "router.augment.horizontal_flip=false"])
    assert config.router.epochs == 4
    assert config.device == "cpu"
    assert config.router.augment.horizontal_flip is False
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(Config(), ["router.epoch=4"])
    with pytest.raises(ConfigError, match="must be an integer"):
        apply_overrides(Config(), ["router.epochs=many"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)
