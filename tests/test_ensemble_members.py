"""Seeds and pooling as ensemble members: a per-network seed for [[extra_global_models]], GeM pooling.

Config keys and limits, GeM's forward/backward and weight loading, that a seed changes a model
and an unset one changes nothing, that a changed seed retrains the network resumed in
its work directory, and a tiny train-all with both options that resumes without retraining.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import cli_error, invoke, train
from conceptclef.category_models import ConceptModel
from conceptclef.core.config import ConfigError, apply_overrides, load_config, save_config
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.run.networks import run_networks
from conceptclef.pipeline.stages.train_networks import ModelPredictions
from conceptclef.training.backbones import GeneralizedMeanPool, create_backbone, create_network, layer_groups
from conceptclef.training.checkpoints import load_checkpoint
from conceptclef.training.estimator import fingerprinted_settings
from synthetic_images import class_concepts, colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "configs" / "test.toml"
CONFIG = load_config(TEST_CONFIG)
SIZE = CONFIG.data.image_size
CUIS = [f"C{index:07d}" for index in range(9)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


# -- config ------------------------------------------------------------------------------------

def test_seed_and_pooling_keys_parse_default_and_round_trip(tmp_path):
    config = load_config(_write(
        tmp_path,
        '[global_model]\npooling = "gem"\ngem_p = 4.0\n'
        '[[extra_global_models]]\nname = "s1"\nseed = 1\n'
        '[[extra_global_models]]\nname = "plain"\npooling = "avg"\n',
    ))
    s1, plain = config.extra_global_models
    assert (s1.seed, s1.pooling, s1.gem_p) == (1, "gem", 4.0)  # pooling is inherited from [global_model]
    assert (plain.seed, plain.pooling) == (-1, "avg")  # -1: the run's seed
    save_config(config, tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml") == config
    overridden = apply_overrides(load_config(None), ['extra_global_models=[{name = "x", seed = 3}]'])
    assert overridden.extra_global_models[0].seed == 3
    assert load_config(None).global_model.pooling == "avg" and load_config(None).global_model.gem_p == 3.0


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[extra_global_models]]\nname = "a"\nseed = -2\n', r"run.toml:3: extra_global_models.0.seed = -2 must be >= -1"),
        ('[[extra_global_models]]\nname = "a"\nseed = 4294967296\n', "must be < 4294967296"),
        ('[global_model]\npooling = "max"\n', r"run.toml:2: global_model.pooling = 'max' is not one of 'avg', 'gem'"),
        ('[router]\ngem_p = 0.5\n', r"run.toml:2: router.gem_p = 0.5 must be >= 1"),
        ("[global_model]\nseed = 3\n", "unknown key 'global_model.seed'"),  # a per-network seed is for extra global models
    ],
)
def test_bad_seed_and_pooling_values_are_refused_with_their_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_gem_on_a_backbone_without_global_pooling_is_refused_before_training(demo_dataset, tmp_path):
    error = cli_error(
        "train-all", "--data", demo_dataset, "--out", tmp_path / "run", "--config", TEST_CONFIG,
        "--set", 'global_model.backbone="test_vit"', "--set", 'global_model.pooling="gem"',
    )
    assert "global_model.pooling" in error and "needs a CNN backbone" in error
    assert not (tmp_path / "run" / "global").exists()


def test_a_job_at_the_defaults_keeps_the_fingerprint_it_had_before_seeds_and_pooling():
    """The digest of this job as commit 3792807 (before `pooling`, `gem_p` and the per-network seed)
    computed it: a run trained then is recognised as finished, not retrained."""
    images, classes = colour_coded_images(48, SIZE, 4, seed=0)
    _, valid_classes = colour_coded_images(24, SIZE, 4, seed=1)
    settings = dataclasses.replace(CONFIG.global_model, finetune="head", epochs=2)
    model = ConceptModel(settings, SIZE, "cpu", seed=3)
    cuis = [f"C{index}" for index in range(9)]
    assert model._fingerprint(cuis, class_concepts(classes, 4), class_concepts(valid_classes, 4)) == "819043363ea009e0806a7fde"


def test_pooling_and_seed_enter_the_fingerprint_only_when_set():
    plain = fingerprinted_settings(CONFIG.global_model)
    assert "pooling" not in plain and "gem_p" not in plain  # runs trained before GeM keep their fingerprint
    assert fingerprinted_settings(dataclasses.replace(CONFIG.global_model, pooling="gem"))["pooling"] == "gem"
    config = apply_overrides(CONFIG, ['extra_global_models=[{name = "same"}, {name = "other", seed = 7}]'])
    same, other = run_networks(RunLayout(Path("run")), config, [])[2:]
    assert (same.seed, other.seed) == (None, 7)


# -- GeM ---------------------------------------------------------------------------------------

def test_gem_is_the_power_mean_and_learns_its_exponent():
    x = torch.rand(2, 5, 4, 4) + 0.01
    assert torch.allclose(GeneralizedMeanPool(1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    gem = GeneralizedMeanPool(3.0)
    out = gem(x)
    assert torch.allclose(out, x.pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-6)
    assert (out > x.mean(dim=(2, 3))).all() and (out <= x.amax(dim=(2, 3)) + 1e-6).all()
    assert GeneralizedMeanPool(3.0, flatten=False)(x).shape == (2, 5, 1, 1)
    out.sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_gem_network_forward_and_backward(backbone):
    torch.manual_seed(0)
    avg = create_network(backbone, "none", 3, 0.0)
    torch.manual_seed(0)
    gem = create_network(backbone, "none", 3, 0.0, pooling="gem", gem_p=3.0)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    assert gem.features(images).shape == avg.features(images).shape == (2, gem.num_features)
    assert not torch.allclose(gem.features(images), avg.features(images))
    gem(images).sum().backward()
    p = dict(gem.backbone.named_parameters())["global_pool.p"]
    assert p.item() == 3.0 and p.grad is not None and p.grad.abs() > 0
    assert all(parameter.grad is not None for parameter in gem.head.parameters())


@pytest.mark.parametrize("fine", [False, True])
def test_gem_exponent_trains_with_the_top_backbone_group(fine):
    avg = layer_groups(create_backbone("test_efficientnet", "none"), fine)
    gem = layer_groups(create_backbone("test_efficientnet", "none", pooling="gem"), fine)
    assert gem[:-1] == avg[:-1] and gem[-1] == avg[-1] + ["global_pool.p"]


def test_gem_backbone_loads_weights_with_and_without_an_exponent(tmp_path):
    torch.manual_seed(0)
    avg = create_backbone("test_resnet", "none")
    torch.save(avg.state_dict(), tmp_path / "avg.pth")
    gem = create_backbone("test_resnet", str(tmp_path / "avg.pth"), pooling="gem", gem_p=2.5)
    assert gem.global_pool.p.item() == 2.5  # ImageNet-style weights: p starts at gem_p
    assert all(torch.equal(value, avg.state_dict()[key]) for key, value in gem.state_dict().items() if key != "global_pool.p")
    with torch.no_grad():
        gem.global_pool.p.fill_(4.0)
    torch.save(gem.state_dict(), tmp_path / "gem.pth")
    assert create_backbone("test_resnet", str(tmp_path / "gem.pth"), pooling="gem").global_pool.p.item() == 4.0
    create_backbone("test_resnet", str(tmp_path / "gem.pth"))  # an average-pooled backbone ignores the exponent


def _data():
    images, classes = colour_coded_images(48, SIZE, 4, seed=0)
    valid_images, valid_classes = colour_coded_images(24, SIZE, 4, seed=1)
    return images, class_concepts(classes, 4), valid_images, class_concepts(valid_classes, 4)


def test_gem_in_head_mode_caches_gem_features_with_a_fixed_exponent(tmp_path):
    images, labels, valid_images, valid_labels = _data()
    settings = dataclasses.replace(CONFIG.global_model, epochs=3, pooling="gem", gem_p=3.0)
    assert settings.finetune == "head"
    model = ConceptModel(settings, SIZE, "cpu", seed=0).fit(images, labels, CUIS, valid_images, valid_labels, tmp_path / "gem")
    backbone = model.network_.backbone
    assert backbone.global_pool.p.item() == 3.0  # frozen with the backbone
    with torch.no_grad():
        feature_map = backbone.forward_features(model.network_.normalise(torch.from_numpy(valid_images).permute(0, 3, 1, 2)))
    expected = feature_map.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    np.testing.assert_allclose(model.embed(valid_images), expected, rtol=1e-4, atol=1e-5)
    avg = ConceptModel(dataclasses.replace(settings, pooling="avg"), SIZE, "cpu", seed=0)
    avg.fit(images, labels, CUIS, valid_images, valid_labels, tmp_path / "avg")
    assert not np.allclose(avg.embed(valid_images), model.embed(valid_images))  # not the cached average features
    loaded = ConceptModel.load(tmp_path / "gem", "cpu")
    np.testing.assert_array_equal(loaded.predict_proba(valid_images), model.predict_proba(valid_images))


def test_gem_exponent_learns_when_the_backbone_trains(tmp_path):
    images, labels, valid_images, valid_labels = _data()
    settings = dataclasses.replace(CONFIG.global_model, finetune="full", epochs=2, pooling="gem", gem_p=3.0)
    model = ConceptModel(settings, SIZE, "cpu", seed=0).fit(images, labels, CUIS, valid_images, valid_labels, tmp_path / "full")
    assert model.network_.backbone.global_pool.p.item() != 3.0
    loaded = ConceptModel.load(tmp_path / "full", "cpu")
    assert loaded.network_.backbone.global_pool.p.item() == model.network_.backbone.global_pool.p.item()


# -- seeds -------------------------------------------------------------------------------------

def test_models_that_differ_only_by_seed_give_different_probabilities(tmp_path):
    images, labels, valid_images, valid_labels = _data()
    settings = dataclasses.replace(CONFIG.global_model, epochs=2)
    probabilities = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        model = ConceptModel(settings, SIZE, "cpu", seed=seed).fit(images, labels, CUIS, valid_images, valid_labels, tmp_path / name)
        probabilities[name] = model.predict_proba(valid_images)
    np.testing.assert_array_equal(probabilities["a"], probabilities["c"])
    assert np.abs(probabilities["a"] - probabilities["b"]).max() > 1e-3
    # Resuming into a finished work directory: the same seed loads it, another seed retrains.
    trained = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    ConceptModel(settings, SIZE, "cpu", seed=1).fit(images, labels, CUIS, valid_images, valid_labels, tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == trained
    model = ConceptModel(settings, SIZE, "cpu", seed=2).fit(images, labels, CUIS, valid_images, valid_labels, tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() != trained and load_checkpoint(tmp_path / "b" / "checkpoint.pt")["seed"] == 2
    assert np.abs(model.predict_proba(valid_images) - probabilities["b"]).max() > 1e-3


# -- end to end --------------------------------------------------------------------------------

MEMBERS = (
    'extra_global_models=[{name = "unset"}, {name = "s1", seed = 1}, '
    '{name = "gem", backbone = "test_efficientnet", pooling = "gem", finetune = "full", epochs = 2}]'
)


def _checkpoint_bytes(run: Path) -> dict[str, bytes]:
    return {path.parent.name: path.read_bytes() for path in sorted(run.glob("*/checkpoint.pt"))}


@pytest.mark.slow
def test_train_all_with_seed_and_gem_members_resumes_and_predicts(demo_dataset, tmp_path):
    run = tmp_path / "run"
    train(demo_dataset, run, "--set", MEMBERS)
    probs = {name: ModelPredictions.load(run / name / "valid_predictions.npz").probs for name in ("global", "global-unset", "global-s1", "global-gem")}
    # Seed unset: the run's seed, so the extra model with [global_model]'s settings IS the global model, byte for byte.
    np.testing.assert_array_equal(probs["global-unset"], probs["global"])
    assert np.abs(probs["global-s1"] - probs["global"]).max() > 1e-3
    assert load_checkpoint(run / "global-s1" / "checkpoint.pt")["seed"] == 1
    gem = load_checkpoint(run / "global-gem" / "checkpoint.pt")
    assert gem["training"]["pooling"] == "gem" and float(gem["model"]["backbone.global_pool.p"]) != 3.0
    assert "global_prob:gem" in (run / "ensemble" / "stacker.json").read_text()

    before = _checkpoint_bytes(run)
    train(demo_dataset, run, "--set", MEMBERS)  # resume: every network is current
    assert _checkpoint_bytes(run) == before
    # A resume cannot change the config (--set is refused); a changed seed retraining its network
    # is shown at the estimator level (test_models_that_differ_only_by_seed_give_different_probabilities).
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", run, "--images", demo_dataset / "test", "--out", out)
    assert out.read_text().count("\n") == 50
