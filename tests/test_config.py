"""The config object: TOML in, frozen dataclasses out, bad files refused with file and line."""

import dataclasses
from pathlib import Path

import pytest

from conceptclef.core import config as config_module
from conceptclef.core.config import Config, ConfigError, apply_overrides, checked, config_from_dict, load_config, save_config

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


BAD_VALUES = {
    # (section, key, value): what the error says about it
    ("ensemble", "knn_neighbours", "0"): "ensemble.knn_neighbours = 0 must be >= 1",
    ("ensemble", "folds", "1"): "ensemble.folds = 1 must be >= 2",
    ("ensemble", "candidates_per_model", "0"): "ensemble.candidates_per_model = 0 must be >= 1",
    ("ensemble", "learning_rate", "0"): "ensemble.learning_rate = 0.0 must be > 0",
    ("router", "learning_rate", "-0.001"): "router.learning_rate = -0.001 must be > 0",
    ("global_model", "batch_size", "0"): "global_model.batch_size = 0 must be >= 1",
    ("category_model", "epochs", "0"): "category_model.epochs = 0 must be >= 1",
    ("data", "image_size", "-32"): "data.image_size = -32 must be >= 1",
    ("ensemble", "max_labels", "0"): "ensemble.max_labels = 0 must be >= 1 (the official checker allows 1 to 100 concepts per image)",
    ("ensemble", "max_labels", "101"): "ensemble.max_labels = 101 must be <= 100 (the official checker allows 1 to 100 concepts per image)",
    ("data", "validation_fraction", "1.0"): "data.validation_fraction = 1.0 must be < 1",
    ("router", "drop_rate", "1.5"): "router.drop_rate = 1.5 must be < 1",
    ("router.augment", "zoom", "-0.1"): "router.augment.zoom = -0.1 must be >= 0",
}


@pytest.mark.parametrize("section, key, value", sorted(BAD_VALUES), ids=lambda part: str(part))
def test_out_of_range_value_names_file_line_and_limit(tmp_path, section, key, value):
    path = write(tmp_path, f"seed = 1\n\n[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}:4: {BAD_VALUES[(section, key, value)]}"


@pytest.mark.parametrize("section, key, value", sorted(BAD_VALUES), ids=lambda part: str(part))
def test_out_of_range_override_names_the_override(section, key, value):
    with pytest.raises(ConfigError) as error:
        apply_overrides(Config(), [f"{section}.{key}={value}"])
    assert str(error.value) == f"--set {section}.{key}={value}: {BAD_VALUES[(section, key, value)]}"


def test_min_labels_above_max_labels_is_refused_at_the_key_or_the_override(tmp_path):
    path = write(tmp_path, "[ensemble]\nmin_labels = 5\nmax_labels = 3\n")
    with pytest.raises(ConfigError, match=r"run\.toml:2: ensemble\.min_labels = 5 must be <= ensemble\.max_labels = 3$"):
        load_config(path)
    base = apply_overrides(Config(), ["ensemble.min_labels=5"])
    with pytest.raises(ConfigError, match=r"^--set ensemble\.max_labels=4: ensemble\.min_labels = 5 must be <= ensemble\.max_labels = 4$"):
        apply_overrides(base, ["ensemble.max_labels=4"])
    assert apply_overrides(base, ["ensemble.max_labels=5"]).ensemble.max_labels == 5  # equal is fine


def test_device_must_be_a_known_kind(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.toml:1: device = 'gpu' must match .* \(auto, cpu, mps, cuda or cuda:N\)"):
        load_config(write(tmp_path, "device = 'gpu'\n"))
    assert load_config(write(tmp_path, "device = 'cuda:3'\n")).device == "cuda:3"  # whether it exists is checked at start


def test_new_fields_get_checks_by_declaring_them():
    @dataclasses.dataclass(frozen=True)
    class Section:
        warmup_epochs: int = checked(0, ge=0, le_key="epochs")
        epochs: int = checked(5, ge=1)

    origin = config_module._Origin("x.toml", "[s]\nwarmup_epochs = 9\n", {})
    with pytest.raises(ConfigError, match=r"^x\.toml:2: s\.warmup_epochs = 9 must be <= s\.epochs = 5$"):
        config_module._build(Section, {"warmup_epochs": 9}, ("s",), origin)
    assert config_from_dict({}).ensemble.max_labels == 100  # the defaults pass their own checks


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=100000", "data.image_size = 100000 must be <= 2048 (the image cache stores size x size x 3 bytes per image"),
        ("extra_global_models=[{name = \"big\", image_size = 5000}]", "extra_global_models.0.image_size = 5000 must be <= 2048"),
        ("data.num_workers=100000", "data.num_workers = 100000 must be <= 256"),
        ("router.epochs=10000000", "router.epochs = 10000000 must be <= 10000"),
        ("global_model.batch_size=10000000", "global_model.batch_size = 10000000 must be <= 65536"),
        ("category_model.learning_rate=inf", "category_model.learning_rate = inf must be a finite number"),
        ("router.learning_rate=1e308", "router.learning_rate = 1e+308 must be <= 10 (a larger rate only diverges"),
        ("router.learning_rate=nan", "router.learning_rate = nan must be a finite number"),
        ("ensemble.learning_rate=inf", "ensemble.learning_rate = inf must be a finite number"),
        ("ensemble.threshold_prior_strength=inf", "ensemble.threshold_prior_strength = inf must be a finite number"),
    ],
)
def test_values_that_would_fill_the_disk_or_never_end_are_refused(override, message):
    with pytest.raises(ConfigError) as error:
        apply_overrides(Config(), [override])
    assert message in str(error.value) and str(error.value).count("\n") == 0
