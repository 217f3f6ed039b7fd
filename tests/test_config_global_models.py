"""[[extra_global_models]], init_from and flip_tta in the config: inheritance, round trip, refusals."""

from pathlib import Path

import pytest

from conceptclef.core.config import ConfigError, apply_overrides, load_config, save_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_extra_global_models_take_the_global_model_values_they_do_not_set(tmp_path):
    path = write(
        tmp_path,
        '[global_model]\nbackbone = "test_resnet"\nlearning_rate = 0.02\nflip_tta = true\n'
        '[[extra_global_models]]\nname = "lite1"\nbackbone = "tf_efficientnet_lite1"\nimage_size = 160\n'
        '[[extra_global_models]]\nname = "again"\n',
    )
    config = load_config(path)
    lite1, again = config.extra_global_models
    assert (lite1.name, lite1.backbone, lite1.image_size, lite1.learning_rate, lite1.flip_tta) == ("lite1", "tf_efficientnet_lite1", 160, 0.02, True)
    assert (again.backbone, again.image_size) == ("test_resnet", 0)
    save_config(config, tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml") == config  # the resolved run config reads back the same
    overridden = apply_overrides(config, ['extra_global_models=[{name = "x", backbone = "test_efficientnet"}]', "category_model.init_from=global"])
    assert [(v.name, v.learning_rate) for v in overridden.extra_global_models] == [("x", 0.02)]
    assert overridden.category_model.init_from == "global"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[extra_global_models]]\nname = "a b"\n', "run.toml:2: extra_global_models name 'a b'"),
        ('[[extra_global_models]]\nname = "a"\n[[extra_global_models]]\nname = "a"\n', "used twice"),
        ('[[extra_global_models]]\nname = "a"\nimage_sise = 3\n', "unknown key"),
        ("[global_model]\ninit_from = \"global\"\n", "run.toml:2: global_model.init_from"),
        ('[category_model]\ninit_from = "imagenet"\n', "is not one of"),
        ("extra_global_models = 3\n", "array of tables"),
    ],
)
def test_bad_extra_global_models_and_init_from_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))
