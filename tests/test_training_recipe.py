"""The fine-tuning recipe: discriminative rates, warm-up and schedule, head warm-start, step budgets,
batch-norm handling, finer unfreeze groups, and the training curves each model writes."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conceptclef.concept_models import ConceptModel
from conceptclef.core.config import load_config
from conceptclef.training import loop
from conceptclef.training.backbones import create_network, layer_groups
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.schedule import learning_rate_factor, parameter_groups, planned_epochs

try:  # the test-only generators move from the package to tests/synthetic_images.py (issue 11.3)
    from synthetic_images import class_concepts, colour_coded_images
except ImportError:
    from conceptclef.training.synthetic import class_concepts, colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
CONCEPTS = [f"C{i}" for i in range(7)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _concept_data(train: int = 40, valid: int = 20):
    images, classes = colour_coded_images(train, SIZE, 3, seed=0)
    valid_images, valid_classes = colour_coded_images(valid, SIZE, 3, seed=1)
    return images, class_concepts(classes, 3), valid_images, class_concepts(valid_classes, 3)


def _start_weights(tmp_path: Path, seed: int = 5) -> tuple[Path, dict[str, torch.Tensor]]:
    """A fixed random backbone saved as a weight file (stands for pretrained weights)."""
    torch.manual_seed(seed)
    state = timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict()
    path = tmp_path / "start.pth"
    torch.save(state, path)
    return path, state


def _finetune(weights: Path, **changes) -> object:
    values = dict(
        weights=str(weights), finetune="layerwise", unfreeze_every_epochs=1, epochs=2, early_stopping_patience=10,
        learning_rate=1e-2, batch_size=16,
    )
    values.update(changes)
    return dataclasses.replace(CONFIG.global_model, **values)


# -- learning-rate groups ---------------------------------------------------------------------------
def test_backbone_groups_learn_at_a_factor_of_the_head_rate_decaying_per_group():
    network = create_network("tf_efficientnet_lite0", "none", 5, 0.0)
    groups = layer_groups(network.backbone, fine=True)
    training = dataclasses.replace(CONFIG.global_model, learning_rate=1e-2, backbone_lr_factor=0.1, layer_lr_decay=0.5)
    optimizer_groups = parameter_groups(network.head, network.backbone, groups, training)

    assert optimizer_groups[0]["name"] == "head" and optimizer_groups[0]["lr"] == pytest.approx(1e-2)
    backbone_rates = [group["lr"] for group in optimizer_groups[1:]]  # top group first
    assert backbone_rates[0] == pytest.approx(1e-3)
    assert backbone_rates == pytest.approx([1e-3 * 0.5**depth for depth in range(len(groups))])
    # every parameter of the network is in exactly one group
    seen = [id(parameter) for group in optimizer_groups for parameter in group["params"]]
    assert len(seen) == len(set(seen)) == len(list(network.parameters()))
    # head mode: the head only, at the head rate
    assert [group["name"] for group in parameter_groups(network.head, None, groups, training)] == ["head"]


def test_the_trained_optimizer_holds_the_discriminative_rates(tmp_path):
    weights, _ = _start_weights(tmp_path)
    training = _finetune(weights, backbone_lr_factor=0.2, layer_lr_decay=0.5, epochs=1, finetune="full")
    images, labels, valid_images, valid_labels = _concept_data()
    work_dir = tmp_path / "model"
    rates = []
    ConceptModel(training, SIZE, "cpu").fit(
        images, labels, CONCEPTS, valid_images, valid_labels, work_dir,
        on_epoch_end=lambda record: rates.extend(
            group["lr"] for group in torch.load(work_dir / "resume.pt", weights_only=True)["optimizer"]["param_groups"]
        ),
    )
    groups = len(layer_groups(timm.create_model("test_resnet", pretrained=False, num_classes=0)))
    assert rates == pytest.approx([1e-2] + [2e-3 * 0.5**depth for depth in range(groups)])


# -- warm-up and schedule ---------------------------------------------------------------------------
def test_linear_warmup_then_cosine_or_constant():
    assert [learning_rate_factor(step, 4, 20, "cosine") for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert learning_rate_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert learning_rate_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_factor(100, 4, 20, "plateau") == 1.0
    assert learning_rate_factor(0, 0, 20, "plateau") == 1.0


def test_warmup_runs_in_optimizer_steps_and_cosine_ends_near_zero(tmp_path):
    weights, _ = _start_weights(tmp_path)
    training = _finetune(weights, finetune="full", schedule="cosine", warmup_steps=3, epochs=3)
    images, labels, valid_images, valid_labels = _concept_data()  # 40 images / 16 = 3 steps an epoch
    model = ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, tmp_path / "model")
    rates = [record["lr"] for record in model.history_]  # the rate after each epoch's last step
    assert rates[0] == pytest.approx(1e-2)  # warm-up over exactly the first epoch's 3 steps
    assert rates[1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert rates[2] == pytest.approx(0.0, abs=1e-12)


# -- head warm-start --------------------------------------------------------------------------------
def test_fine_tuning_starts_from_the_head_trained_on_cached_features(tmp_path, monkeypatch):
    weights, start = _start_weights(tmp_path)
    training = _finetune(weights, head_warmup_epochs=4, epochs=1)
    images, labels, valid_images, valid_labels = _concept_data()
    heads_at_start = []
    original_fit = loop.Trainer.fit

    def spy(self, *arguments, **keywords):
        heads_at_start.append((self.training.finetune, {k: v.clone() for k, v in self.network.head.state_dict().items()}))
        return original_fit(self, *arguments, **keywords)

    monkeypatch.setattr(loop.Trainer, "fit", spy)
    store = FeatureStore()
    work_dir = tmp_path / "model"
    ConceptModel(training, SIZE, "cpu", feature_store=store).fit(images, labels, CONCEPTS, valid_images, valid_labels, work_dir)

    assert [mode for mode, _ in heads_at_start] == ["head", "layerwise"]  # the warm-up ran first, on features
    assert store.rows_computed == 60  # one backbone pass over train and valid images
    warmed = torch.load(work_dir / loop.HEAD_WARMUP_FOLDER / "checkpoint.pt", weights_only=True)
    assert len(warmed["history"]) == 4
    untrained_head, fine_tune_start = heads_at_start[0][1], heads_at_start[1][1]
    for key, value in fine_tune_start.items():
        torch.testing.assert_close(value, warmed["model"][f"head.{key}"], rtol=0, atol=0)
        assert not torch.equal(value, untrained_head[key])  # the warm-up did train it
    for key, value in start.items():  # and left the backbone untouched
        torch.testing.assert_close(warmed["model"][f"backbone.{key}"], value, rtol=0, atol=0)


class Interrupted(Exception):
    """Stands for a killed process: raised after an epoch's checkpoint is on disk."""


def _interrupt(record: dict) -> None:
    raise Interrupted


def test_an_interrupted_fine_tuning_does_not_train_its_head_warmup_again(tmp_path, monkeypatch):
    weights, _ = _start_weights(tmp_path)
    training = _finetune(weights, head_warmup_epochs=3, epochs=2)
    images, labels, valid_images, valid_labels = _concept_data()
    work_dir = tmp_path / "model"
    with pytest.raises(Interrupted):
        ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, work_dir, on_epoch_end=_interrupt)
    warmed = torch.load(work_dir / loop.HEAD_WARMUP_FOLDER / "checkpoint.pt", weights_only=True)
    modes, epochs = [], []
    original_fit = loop.Trainer.fit

    def spy(self, *arguments, **keywords):
        modes.append(self.training.finetune)
        return original_fit(self, *arguments, **keywords)

    monkeypatch.setattr(loop.Trainer, "fit", spy)
    ConceptModel(training, SIZE, "cpu").fit(
        images, labels, CONCEPTS, valid_images, valid_labels, work_dir, on_epoch_end=lambda record: epochs.append(record["epoch"])
    )
    assert modes == ["layerwise"] and epochs == [2]  # resumed after fine-tuning epoch 1, the warm-up only loaded

    # a fine-tuning that restarts from scratch (no resume state) loads the finished warm-up
    (work_dir / "state.json").unlink()
    (work_dir / "checkpoint.pt").unlink()
    modes.clear()
    ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, work_dir)
    assert modes == ["layerwise"]
    again = torch.load(work_dir / loop.HEAD_WARMUP_FOLDER / "checkpoint.pt", weights_only=True)
    assert again["history"] == warmed["history"]


def test_changing_only_the_fine_tuning_keeps_the_finished_head_warmup(tmp_path, monkeypatch):
    weights, _ = _start_weights(tmp_path)
    images, labels, valid_images, valid_labels = _concept_data()
    work_dir = tmp_path / "model"
    ConceptModel(_finetune(weights, head_warmup_epochs=3, epochs=1), SIZE, "cpu").fit(
        images, labels, CONCEPTS, valid_images, valid_labels, work_dir
    )
    modes = []
    original_fit = loop.Trainer.fit

    def spy(self, *arguments, **keywords):
        modes.append(self.training.finetune)
        return original_fit(self, *arguments, **keywords)

    monkeypatch.setattr(loop.Trainer, "fit", spy)
    tuned = _finetune(weights, head_warmup_epochs=3, epochs=2, backbone_lr_factor=0.5, schedule="cosine", warmup_steps=2)
    ConceptModel(tuned, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, work_dir)
    assert modes == ["layerwise"]  # the fine-tuning trained again, its warm-up was loaded
    modes.clear()
    ConceptModel(dataclasses.replace(tuned, head_warmup_learning_rate=1e-3), SIZE, "cpu").fit(
        images, labels, CONCEPTS, valid_images, valid_labels, work_dir
    )
    assert modes == ["head", "layerwise"]  # a different warm-up is never reused


def test_a_resume_state_of_another_job_never_skips_the_warm_start(tmp_path, monkeypatch):
    weights, _ = _start_weights(tmp_path)
    images, labels, valid_images, valid_labels = _concept_data()
    work_dir = tmp_path / "model"
    with pytest.raises(Interrupted):
        ConceptModel(_finetune(weights, head_warmup_epochs=3, epochs=2), SIZE, "cpu").fit(
            images, labels, CONCEPTS, valid_images, valid_labels, work_dir, on_epoch_end=_interrupt
        )
    assert (work_dir / "resume.pt").is_file()
    heads = []
    original_fit = loop.Trainer.fit

    def spy(self, *arguments, **keywords):
        heads.append({key: value.clone() for key, value in self.network.head.state_dict().items()})
        return original_fit(self, *arguments, **keywords)

    monkeypatch.setattr(loop.Trainer, "fit", spy)
    ConceptModel(_finetune(weights, head_warmup_epochs=3, epochs=2, backbone_lr_factor=0.5), SIZE, "cpu").fit(
        images, labels, CONCEPTS, valid_images, valid_labels, work_dir
    )
    warmed = torch.load(work_dir / loop.HEAD_WARMUP_FOLDER / "checkpoint.pt", weights_only=True)["model"]
    assert len(heads) == 1  # the warm-up was loaded, and the other job's resume state was not used
    for key, value in heads[0].items():
        torch.testing.assert_close(value, warmed[f"head.{key}"], rtol=0, atol=0)


# -- step budgets -----------------------------------------------------------------------------------
def test_step_budgets_raise_and_cap_the_epochs():
    training = dataclasses.replace(CONFIG.global_model, batch_size=16, epochs=4)
    assert planned_epochs(training, 40) == 4
    assert planned_epochs(dataclasses.replace(training, min_steps=30), 40) == 10  # 3 steps an epoch
    assert planned_epochs(dataclasses.replace(training, min_steps=30), 4000) == 4  # a large set already has them
    assert planned_epochs(dataclasses.replace(training, max_steps=500), 4000) == 2  # 250 steps an epoch
    assert planned_epochs(dataclasses.replace(training, max_steps=5), 4000) == 1


def test_a_small_category_gets_at_least_the_minimum_steps(tmp_path):
    training = dataclasses.replace(CONFIG.global_model, epochs=1, min_steps=9, batch_size=16, early_stopping_patience=20)
    images, labels, valid_images, valid_labels = _concept_data(train=20)  # 2 steps an epoch
    steps = []
    original = torch.optim.AdamW.step

    def counted(self, *arguments, **keywords):
        steps.append(1)
        return original(self, *arguments, **keywords)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", counted)
        model = ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, tmp_path / "small")
    assert len(model.history_) == 5 and len(steps) == 10


# -- batch norm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_frozen_batch_norm_statistics_never_learn_from_training_batches(tmp_path, batchnorm):
    weights, start = _start_weights(tmp_path)
    training = _finetune(weights, finetune="full", epochs=1, batchnorm=batchnorm)
    images, labels, valid_images, valid_labels = _concept_data()
    ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, tmp_path / "model")
    state = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["model"]
    statistics = [key for key in start if key.endswith(("running_mean", "running_var"))]
    unchanged = [torch.equal(state[f"backbone.{key}"], start[key]) for key in statistics]
    assert statistics and (all(unchanged) if batchnorm == "frozen" else not any(unchanged))
    assert not torch.equal(state["backbone.conv1.0.weight"], start["conv1.0.weight"])  # the weights trained either way


# -- finer unfreeze groups --------------------------------------------------------------------------
def test_fine_groups_give_every_block_and_the_final_conv_a_group_of_their_own():
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    coarse, fine = layer_groups(backbone), layer_groups(backbone, fine=True)
    assert len(coarse) == 8 and "conv_head.weight" in coarse[-1] and "blocks.6.0.conv_pw.weight" in coarse[-1]
    assert fine[-1] == ["conv_head.weight", "bn2.weight", "bn2.bias"]
    blocks = [{name.split(".")[1] + "." + name.split(".")[2] for name in group} for group in fine[1:-1]]
    assert all(len(block) == 1 for block in blocks) and len(blocks) == 16  # one block each, bottom to top
    everything = sorted(name for name, _ in backbone.named_parameters())
    assert sorted(name for group in fine for name in group) == everything == sorted(name for group in coarse for name in group)


def test_layerwise_never_unfreezes_more_than_the_cap(tmp_path):
    weights, start = _start_weights(tmp_path)
    training = _finetune(weights, head_warmup_epochs=2, epochs=3, max_unfrozen_groups=1)
    images, labels, valid_images, valid_labels = _concept_data()
    ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, tmp_path / "model")
    state = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["model"]

    def changed(prefix: str) -> bool:
        keys = [key for key in start if key.startswith(prefix) and "num_batches" not in key]
        return any(not torch.equal(state[f"backbone.{key}"], start[key]) for key in keys)

    assert changed("layer4") and not any(changed(prefix) for prefix in ("conv1", "layer1", "layer2", "layer3"))


# -- training curves --------------------------------------------------------------------------------
def test_every_model_writes_its_curves_as_csv_and_png(tmp_path):
    weights, _ = _start_weights(tmp_path)
    images, labels, valid_images, valid_labels = _concept_data()
    work_dir = tmp_path / "model"
    model = ConceptModel(_finetune(weights, head_warmup_epochs=3, epochs=2), SIZE, "cpu").fit(
        images, labels, CONCEPTS, valid_images, valid_labels, work_dir
    )
    for folder, epochs in ((work_dir, 2), (work_dir / loop.HEAD_WARMUP_FOLDER, 3)):
        with open(folder / "metrics.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert [int(row["epoch"]) for row in rows] == list(range(1, epochs + 1))
        assert all(np.isfinite(float(row["train_loss"])) and 0 <= float(row["valid_metric"]) <= 1 for row in rows)
        png = (folder / "curves.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        if folder == work_dir:
            assert [float(row["valid_metric"]) for row in rows] == [record["valid_metric"] for record in model.history_]


def test_a_head_mode_model_writes_its_curves_too(tmp_path):
    training = dataclasses.replace(CONFIG.global_model, epochs=2, early_stopping_patience=5)
    images, labels, valid_images, valid_labels = _concept_data()
    ConceptModel(training, SIZE, "cpu").fit(images, labels, CONCEPTS, valid_images, valid_labels, tmp_path / "head")
    assert (tmp_path / "head" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "head" / loop.HEAD_WARMUP_FOLDER).exists()  # head mode needs no warm-up of its own
