"""The shared loop: resume, damaged checkpoints, early stopping, fine-tuning modes, repeatability."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import ConfigError, load_config
from conceptclef.router import ModalityRouter
from conceptclef.training.backbones import ImageClassifier
from conceptclef.training.checkpoints import CheckpointError, save_checkpoint
from synthetic_images import class_concepts, colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
ROUTER = dataclasses.replace(CONFIG.router, epochs=3, early_stopping_patience=5, drop_rate=0.2)


class Interrupted(Exception):
    """Stands for a killed process: raised after an epoch's checkpoint is on disk."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _router_data(seed: int = 0):
    images, classes = colour_coded_images(48, SIZE, 3, seed=seed)
    valid_images, valid_classes = colour_coded_images(24, SIZE, 3, seed=seed + 100)
    return images, [f"cat{c}" for c in classes], valid_images, [f"cat{c}" for c in valid_classes]


def _interrupt_after(epoch: int):
    def callback(record: dict) -> None:
        if record["epoch"] == epoch:
            raise Interrupted

    return callback


def _no_training(record: dict) -> None:
    raise AssertionError("a finished run was trained again")


def _history_without_time(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


@pytest.fixture(scope="module")
def finished_router(tmp_path_factory) -> tuple[Path, np.ndarray, list[dict]]:
    """An uninterrupted 3-epoch run: (work dir, validation probabilities, history)."""
    torch.set_num_threads(1)
    work_dir = tmp_path_factory.mktemp("uninterrupted") / "router"
    images, categories, valid_images, valid_categories = _router_data()
    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=3).fit(images, categories, valid_images, valid_categories, work_dir)
    return work_dir, router.predict_proba(valid_images), router.history_


def test_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, finished_router):
    _, expected, expected_history = finished_router
    images, categories, valid_images, valid_categories = _router_data()
    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=3)
    with pytest.raises(Interrupted):
        router.fit(images, categories, valid_images, valid_categories, tmp_path, on_epoch_end=_interrupt_after(2))
    assert not ModalityRouter.is_trained(tmp_path)
    resume = torch.load(tmp_path / "resume.pt", weights_only=True)  # plain tensors and values only
    assert resume["epoch"] == 2 and len(resume["history"]) == 2

    epochs_run = []
    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=3)
    router.fit(images, categories, valid_images, valid_categories, tmp_path, on_epoch_end=lambda r: epochs_run.append(r["epoch"]))
    assert epochs_run == [3]  # only the missing epoch was trained
    assert _history_without_time(router.history_) == _history_without_time(expected_history)
    np.testing.assert_array_equal(router.predict_proba(valid_images), expected)
    assert ModalityRouter.is_trained(tmp_path) and not (tmp_path / "resume.pt").exists()


def test_truncated_resume_checkpoint_is_retrained_from_scratch(tmp_path, finished_router, caplog):
    _, expected, _ = finished_router
    images, categories, valid_images, valid_categories = _router_data()
    with pytest.raises(Interrupted):
        ModalityRouter(ROUTER, SIZE, "cpu", seed=3).fit(
            images, categories, valid_images, valid_categories, tmp_path, on_epoch_end=_interrupt_after(1)
        )
    resume = tmp_path / "resume.pt"
    resume.write_bytes(resume.read_bytes()[: resume.stat().st_size // 2])
    epochs_run = []
    with caplog.at_level(logging.WARNING, logger="conceptclef"):
        router = ModalityRouter(ROUTER, SIZE, "cpu", seed=3).fit(
            images, categories, valid_images, valid_categories, tmp_path, on_epoch_end=lambda r: epochs_run.append(r["epoch"])
        )
    assert "cannot resume" in caplog.text and "training from scratch" in caplog.text
    assert epochs_run == [1, 2, 3]
    np.testing.assert_array_equal(router.predict_proba(valid_images), expected)


def test_finished_run_is_loaded_not_retrained(finished_router):
    work_dir, expected, expected_history = finished_router
    images, categories, valid_images, valid_categories = _router_data()
    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=3).fit(
        images, categories, valid_images, valid_categories, work_dir, on_epoch_end=_no_training
    )
    np.testing.assert_array_equal(router.predict_proba(valid_images), expected)
    assert router.history_ == expected_history
    checkpoint = torch.load(work_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["kind"] == "router" and checkpoint["classes"] == ["cat0", "cat1", "cat2"]


def test_changed_config_is_trained_again_not_loaded(tmp_path, finished_router):
    work_dir = tmp_path / "router"
    shutil.copytree(finished_router[0], work_dir)
    images, categories, valid_images, valid_categories = _router_data()
    epochs_run = []
    ModalityRouter(dataclasses.replace(ROUTER, epochs=1), SIZE, "cpu", seed=3).fit(
        images, categories, valid_images, valid_categories, work_dir, on_epoch_end=lambda r: epochs_run.append(r["epoch"])
    )
    assert epochs_run == [1]


def test_damaged_finished_checkpoint_is_detected_and_retrained(tmp_path, finished_router, caplog):
    work_dir = tmp_path / "router"
    shutil.copytree(finished_router[0], work_dir)
    checkpoint = work_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert not ModalityRouter.is_trained(work_dir)
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        ModalityRouter.load(work_dir)
    images, categories, valid_images, valid_categories = _router_data()
    with caplog.at_level(logging.WARNING, logger="conceptclef"):
        router = ModalityRouter(ROUTER, SIZE, "cpu", seed=3).fit(images, categories, valid_images, valid_categories, work_dir)
    assert any("finished run cannot be loaded" in message and message.endswith("; training from scratch") for message in caplog.messages)
    np.testing.assert_array_equal(router.predict_proba(valid_images), finished_router[1])
    assert ModalityRouter.is_trained(work_dir)


def test_a_checkpoint_with_settings_this_version_does_not_know_is_refused(tmp_path, finished_router):
    """As core.config refuses unknown keys in a TOML: dropping them would load a network trained
    with a setting that no longer means anything."""
    work_dir = tmp_path / "router"
    shutil.copytree(finished_router[0], work_dir)
    payload = torch.load(work_dir / "checkpoint.pt", weights_only=True)
    payload["training"]["retired_setting"] = 0.1
    payload["training"]["augment"]["retired_flip"] = True
    save_checkpoint(work_dir / "checkpoint.pt", payload)
    expected = f"{work_dir / 'checkpoint.pt'}: training settings unknown to this version of conceptclef: retired_setting, augment.retired_flip"
    with pytest.raises(ConfigError) as refused:
        ModalityRouter.load(work_dir)
    assert str(refused.value) == expected


def test_same_seed_repeats_exactly_and_another_seed_does_not(tmp_path, finished_router):
    images, categories, valid_images, valid_categories = _router_data()
    again = ModalityRouter(ROUTER, SIZE, "cpu", seed=3).fit(images, categories, valid_images, valid_categories, tmp_path / "a")
    np.testing.assert_array_equal(again.predict_proba(valid_images), finished_router[1])
    other = ModalityRouter(ROUTER, SIZE, "cpu", seed=4).fit(images, categories, valid_images, valid_categories, tmp_path / "b")
    assert not np.array_equal(other.predict_proba(valid_images), finished_router[1])


def test_early_stopping_and_lr_reduction_follow_the_validation_metric(tmp_path):
    images, categories, valid_images, valid_categories = _router_data()
    frozen = dataclasses.replace(
        CONFIG.router, finetune="head", learning_rate=1e-12, epochs=20, early_stopping_patience=3,
        lr_reduce_patience=0, lr_reduce_factor=0.5,
    )  # nothing can improve the first epoch's accuracy
    router = ModalityRouter(frozen, SIZE, "cpu").fit(images, categories, valid_images, valid_categories, tmp_path)
    assert len(router.history_) == 4  # the first epoch + 3 without improvement
    assert [row["lr"] for row in router.history_] == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13])
    state = (tmp_path / "state.json").read_text()
    assert '"stopped_early": true' in state
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,valid_metric,lr,seconds" and len(lines) == 5


def test_head_mode_computes_backbone_features_once(tmp_path, monkeypatch):
    calls = []
    original = ImageClassifier.features

    def counted(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(ImageClassifier, "features", counted)
    images, classes = colour_coded_images(40, SIZE, 3, seed=0)
    valid_images, valid_classes = colour_coded_images(20, SIZE, 3, seed=1)
    training = dataclasses.replace(CONFIG.global_model, finetune="head", epochs=5, early_stopping_patience=10, batch_size=16)
    model = ConceptModel(training, SIZE, "cpu").fit(
        images, class_concepts(classes, 3), [f"C{i}" for i in range(7)], valid_images, class_concepts(valid_classes, 3), tmp_path
    )
    assert len(model.history_) == 5
    assert len(calls) == math.ceil(40 / 16) + math.ceil(20 / 16)  # one pass over train and valid, not one per epoch
    assert sum(calls) == 60


def test_layerwise_unfreezes_one_more_stage_per_period(tmp_path):
    torch.manual_seed(5)
    start = timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict()
    weights = tmp_path / "start.pth"
    torch.save(start, weights)
    training = dataclasses.replace(
        CONFIG.router, weights=str(weights), finetune="layerwise", unfreeze_every_epochs=1, epochs=3,
        early_stopping_patience=5, learning_rate=1e-2,
    )
    snapshots = []
    work_dir = tmp_path / "router"

    def snapshot(record: dict) -> None:
        snapshots.append(torch.load(work_dir / "resume.pt", weights_only=True)["model"])

    images, categories, valid_images, valid_categories = _router_data()
    ModalityRouter(training, SIZE, "cpu").fit(images, categories, valid_images, valid_categories, work_dir, on_epoch_end=snapshot)

    def changed(state: dict, prefix: str) -> bool:
        keys = [key for key in start if key.startswith(prefix) and "num_batches" not in key]
        return any(not torch.equal(state[f"backbone.{key}"], start[key]) for key in keys)

    after_1, after_2, after_3 = snapshots
    assert not any(changed(after_1, prefix) for prefix in ("conv1", "layer1", "layer2", "layer3", "layer4"))
    assert changed(after_2, "layer4") and not changed(after_2, "layer3")
    assert changed(after_3, "layer3") and not changed(after_3, "layer2") and not changed(after_3, "conv1")


def test_full_mode_trains_the_whole_network_with_nadam(tmp_path):
    torch.manual_seed(6)
    start = timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict()
    torch.save(start, tmp_path / "start.pth")
    training = dataclasses.replace(
        CONFIG.router, weights=str(tmp_path / "start.pth"), finetune="full", optimizer="nadam", epochs=1
    )
    images, categories, valid_images, valid_categories = _router_data()
    ModalityRouter(training, SIZE, "cpu").fit(images, categories, valid_images, valid_categories, tmp_path / "router")
    state = torch.load(tmp_path / "router" / "checkpoint.pt", weights_only=True)
    assert state["training"]["optimizer"] == "nadam"
    assert not torch.equal(state["model"]["backbone.conv1.0.weight"], start["conv1.0.weight"])  # the stem trained too


def test_a_metric_stuck_at_zero_does_not_trigger_early_stopping(tmp_path):
    images, classes = colour_coded_images(32, SIZE, 3, seed=0)
    valid_images, valid_classes = colour_coded_images(16, SIZE, 3, seed=1)
    labels, valid_labels = class_concepts(classes, 3)[:, :6], class_concepts(valid_classes, 3)[:, :6]
    # lr 0: the class concepts (frequency ~1/3, so a starting probability ~1/3) never reach 0.5
    training = dataclasses.replace(CONFIG.global_model, learning_rate=0.0, epochs=5, early_stopping_patience=1)
    model = ConceptModel(training, SIZE, "cpu").fit(images, labels, [f"C{i}" for i in range(6)], valid_images, valid_labels, tmp_path)
    assert [row["valid_metric"] for row in model.history_] == [0.0] * 5


def test_the_loop_moves_the_objective_to_the_training_device(tmp_path, monkeypatch):
    """Class weights are built on the CPU: fit_network must move the loss where the network trains."""
    from conceptclef.training.loop import Objective

    moved_to: list[torch.device] = []

    @dataclasses.dataclass(frozen=True)
    class SpyObjective(Objective):
        def on(self, device):
            moved_to.append(torch.device(device))
            return super().on(device)

    original = ModalityRouter._objective

    def spied(self, targets, num_classes):
        objective = original(self, targets, num_classes)
        return SpyObjective(objective.loss, objective.activation, objective.metric_name, objective.metric)

    monkeypatch.setattr(ModalityRouter, "_objective", spied)
    images, categories, valid_images, valid_categories = _router_data()
    training = dataclasses.replace(ROUTER, epochs=1, class_weights=True)
    ModalityRouter(training, SIZE, "cpu", seed=3).fit(images, categories, valid_images, valid_categories, tmp_path)
    assert moved_to == [torch.device("cpu")]
