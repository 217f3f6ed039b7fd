"""Specialists started from the global model, extra global models as stacker inputs, flip TTA.

End to end on the small shared demo dataset with the test config: what the stacker learns from
and what predict feeds it must come from the same models read the same way, and a specialist
must never outlive the global model it started from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import invoke, run_cli, train
from conceptclef.category_models import ConceptModel
from conceptclef.core.config import TrainingConfig, load_config
from conceptclef.pipeline.stages import tta
from conceptclef.pipeline.stages.train_networks import ModelPredictions
from conceptclef.pipeline.image_sets import load_training_sets
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.image_sets import config_at_image_size
from conceptclef.pipeline.run.networks import run_networks
from conceptclef.pipeline.stages.predict import RunModels, predict_submission
from conceptclef.pipeline.run.directory import Manifest
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.run.specialist_init import specialist_training
from conceptclef.pipeline.stages.train_all import ModelJob, dependency_waves, train_all
from conceptclef.training.backbones import create_network
from conceptclef.training.checkpoints import load_checkpoint, save_checkpoint

# The global model fine-tunes its backbone: a frozen one would equal the specialists' own start.
SPECIALISTS_FROM_GLOBAL = (
    "--set", "global_model.finetune=\"full\"",
    "--set", "global_model.epochs=2",
    "--set", "category_model.init_from=\"global\"",
    "--set", "category_model.epochs=2",
)
EXTRA_GLOBAL = 'extra_global_models=[{name = "effnet", backbone = "test_efficientnet", image_size = 48}]'


def _backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.startswith("backbone.")}


@pytest.fixture(scope="module")
def specialist_run(demo_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("specialists") / "run"
    train(demo_dataset, run_dir, *SPECIALISTS_FROM_GLOBAL)
    return run_dir


def _trained_categories(run_dir: Path) -> list[str]:
    manifest = Manifest.load(RunLayout(run_dir))
    return [category for category in manifest.categories if category not in manifest.fallback_categories]


@pytest.mark.slow
def test_specialist_backbone_starts_as_the_fine_tuned_global_backbone(specialist_run):
    layout = RunLayout(specialist_run)
    config = load_config(layout.config_path)
    category = _trained_categories(specialist_run)[0]
    settings = specialist_training(config, layout, layout.category_dir(category))
    start = create_network(settings.backbone, settings.weights, 3, 0.0).state_dict()
    global_state = load_checkpoint(layout.global_dir / "checkpoint.pt")["model"]
    imagenet_like = create_network(config.category_model.backbone, config.category_model.weights, 3, 0.0).state_dict()
    differs_from_own_start = False
    for key, value in _backbone_state(global_state).items():
        assert torch.equal(start[key], value), key
        differs_from_own_start |= not torch.equal(imagenet_like[key], value)
    assert differs_from_own_start, "the global model did not fine-tune its backbone: the test would prove nothing"
    record = json.loads((layout.category_dir(category) / "init.json").read_text())
    assert record["init_from"] == "global" and len(record["global_checkpoint_sha256"]) == 64
    # The specialist trains its head only (test config): its finished backbone IS the global one.
    assert config.category_model.finetune == "head"
    trained = load_checkpoint(layout.category_dir(category) / "checkpoint.pt")["model"]
    assert all(torch.equal(trained[key], value) for key, value in _backbone_state(global_state).items())


@pytest.mark.slow
def test_a_changed_global_model_invalidates_its_specialists(specialist_run, demo_dataset, tmp_path):
    layout = RunLayout(specialist_run)
    categories = _trained_categories(specialist_run)
    before = {c: (layout.category_dir(c) / "checkpoint.pt").read_bytes() for c in categories}
    # A global model retrained since (here: its weights changed in place, as a retrain would).
    payload = load_checkpoint(layout.global_dir / "checkpoint.pt")
    key = next(key for key in payload["model"] if key.startswith("backbone.") and payload["model"][key].is_floating_point())
    payload["model"][key] = payload["model"][key] + 0.01
    save_checkpoint(layout.global_dir / "checkpoint.pt", payload)

    with pytest.raises(RunDirectoryError, match="older global model"):
        RunModels.load(layout, Manifest.load(layout), load_config(layout.config_path))
    refused = run_cli("train-all", "--data", demo_dataset, "--out", specialist_run, "--only", "ensemble")
    assert refused.exit_code != 0 and "started from an older global model" in str(refused.exception) + refused.output

    train_all(demo_dataset, specialist_run)  # resume: retrains exactly the specialists
    new_digest = json.loads((layout.category_dir(categories[0]) / "init.json").read_text())["global_checkpoint_sha256"]
    for category in categories:
        record = json.loads((layout.category_dir(category) / "init.json").read_text())
        assert record["global_checkpoint_sha256"] == new_digest
        assert (layout.category_dir(category) / "checkpoint.pt").read_bytes() != before[category], category
    predict_submission(specialist_run, demo_dataset / "test", tmp_path / "submission.tsv")
    assert (tmp_path / "submission.tsv").read_text().count("\n") == 50


def test_specialists_from_global_need_the_global_model(demo_dataset, tmp_path):
    result = run_cli(
        "train-all", "--data", demo_dataset, "--out", tmp_path / "run", "--config", Path(__file__).parents[1] / "configs" / "test.toml",
        "--only", "DRCT", "--set", 'category_model.init_from="global"',
    )
    assert result.exit_code != 0
    assert "init_from" in result.output and "not trained" in result.output
    assert not (tmp_path / "run" / "category-DRCT" / "checkpoint.pt").exists()


def test_parallel_waves_train_specialists_after_the_global_model():
    from conceptclef.core.config import Config, ExtraGlobalModel

    def jobs(config: Config) -> list[ModelJob]:
        networks = {network.name: network for network in run_networks(RunLayout(Path("run")), config, ["DRAN"])}
        return [ModelJob(networks[name], None, size) for name, size in (("DRAN", 11), ("router", 140), ("global", 140), ("global-b", 140))]

    config = Config(extra_global_models=(ExtraGlobalModel(name="b"),))
    assert [[job.name for job in wave] for wave in dependency_waves(jobs(config))] == [["DRAN", "router", "global", "global-b"]]
    config = config.replace(category_model=TrainingConfig(init_from="global"))
    assert [[job.name for job in wave] for wave in dependency_waves(jobs(config))] == [["router", "global", "global-b"], ["DRAN"]]


@pytest.fixture(scope="module")
def two_global_run(demo_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two-globals") / "run"
    train(demo_dataset, run_dir, "--set", EXTRA_GLOBAL, "--set", "global_model.flip_tta=true", "--set", "router.flip_tta=true")
    return run_dir


@pytest.mark.slow
def test_two_global_models_reach_the_stacker_predict_and_ablation(two_global_run, demo_dataset, tmp_path):
    stacker = json.loads((two_global_run / "ensemble" / "stacker.json").read_text())
    names = json.dumps(stacker)
    assert "global_prob:effnet" in names and "global_models_mean" in names and "rank:global:effnet" in names
    extra = ModelPredictions.load(two_global_run / "global-effnet" / "valid_predictions.npz")
    assert extra.probs.shape == ModelPredictions.load(two_global_run / "global" / "valid_predictions.npz").probs.shape
    assert load_checkpoint(two_global_run / "global-effnet" / "checkpoint.pt")["image_size"] == 48

    layout = RunLayout(two_global_run)
    models = RunModels.load(layout, Manifest.load(layout), load_config(layout.config_path))
    assert set(models.extra_global_models) == {"effnet"}
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", two_global_run, "--images", demo_dataset / "test", "--out", out)
    assert out.read_text().count("\n") == 50
    report = tmp_path / "ablation"
    invoke("ablation", "--run", two_global_run, "--images", demo_dataset / "test", "--gt", demo_dataset / "test_concepts.csv", "--out", report)
    text = "\n".join(path.read_text() for path in report.iterdir() if path.suffix in (".md", ".csv"))
    assert "global-effnet + tuned thresholds" in text


@pytest.mark.slow
def test_flip_tta_reads_validation_and_test_images_the_same_way(two_global_run, demo_dataset):
    """The saved validation probabilities (the stacker's training data) are what predict computes
    for the same images, and both are the average over each image and its mirror."""
    layout = RunLayout(two_global_run)
    config = load_config(layout.config_path)
    models = RunModels.load(layout, Manifest.load(layout), config)
    _, valid = load_training_sets(demo_dataset, config)
    saved = ModelPredictions.load(layout.global_dir / "valid_predictions.npz")
    # The extra model left flip_tta out, so it took [global_model]'s value.
    assert models.global_model.training.flip_tta and models.extra_global_models["effnet"].training.flip_tta
    plain = models.global_model.predict_proba(valid.images)
    mirror = models.global_model.predict_proba(tta.mirrored(valid.images))
    assert np.abs(plain - mirror).max() > 1e-4  # the mirror is a different input
    np.testing.assert_allclose(saved.probs, 0.5 * (plain + mirror), atol=1e-5)
    # The test path: predict's outputs on these images equal the saved validation ones.
    outputs = models.predict(valid, lambda size: load_training_sets(demo_dataset, config_at_image_size(config, size))[1])
    np.testing.assert_allclose(outputs.global_probs, saved.probs, atol=1e-5)
    np.testing.assert_allclose(outputs.router_probs, ModelPredictions.load(layout.router_dir / "valid_predictions.npz").probs, atol=1e-5)
    np.testing.assert_allclose(outputs.extra_global_probs["effnet"], ModelPredictions.load(layout.root / "global-effnet" / "valid_predictions.npz").probs, atol=1e-5)


def test_flip_tta_gives_a_symmetric_image_its_plain_probabilities(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    labels = (rng.random((12, 4)) < 0.4).astype(np.float32)
    settings = TrainingConfig(backbone="test_resnet", weights="none", finetune="full", epochs=1, batch_size=4, flip_tta=True)
    model = ConceptModel(settings, 32, "cpu").fit(images[:8], labels[:8], list("abcd"), images[8:], labels[8:], tmp_path / "model")
    symmetric = np.concatenate([images[:, :, :16], images[:, :, :16][:, :, ::-1]], axis=2)
    np.testing.assert_array_equal(symmetric, tta.mirrored(symmetric))
    np.testing.assert_allclose(tta.predict_proba(model, symmetric), model.predict_proba(symmetric), atol=1e-6)
    # Any image and its mirror get the same TTA probabilities; without TTA they differ.
    np.testing.assert_allclose(tta.predict_proba(model, images), tta.predict_proba(model, tta.mirrored(images)), atol=1e-6)
    assert np.abs(model.predict_proba(images) - model.predict_proba(tta.mirrored(images))).max() > 1e-5
    loaded = ConceptModel.load(tmp_path / "model", "cpu")
    assert tta.uses_flip_tta(loaded)  # predict reads the switch from the checkpoint, as train-all did
