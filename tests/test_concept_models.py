"""ConceptModel: learns easy concepts, probabilities and embeddings from one pass, reloads, every loss trains."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conceptclef.concept_models import ConceptModel
from conceptclef.concept_models.model import sample_f1_at_threshold
from conceptclef.core.config import load_config
from conceptclef.scoring.f1 import sample_f1
from conceptclef.training.losses import LOSS_NAMES
from synthetic_images import class_concepts, colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
CUIS = [f"C{index:07d}" for index in range(9)]  # 4 classes x 2 concepts + 1 shared


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data():
    images, classes = colour_coded_images(64, SIZE, 4, seed=0)
    valid_images, valid_classes = colour_coded_images(32, SIZE, 4, seed=1)
    return images, class_concepts(classes, 4), valid_images, class_concepts(valid_classes, 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    images, labels, valid_images, valid_labels = _data()
    training = dataclasses.replace(CONFIG.global_model, epochs=20, early_stopping_patience=5)
    work_dir = tmp_path_factory.mktemp("concepts") / "global"
    model = ConceptModel(training, SIZE, "cpu").fit(images, labels, CUIS, valid_images, valid_labels, work_dir)
    return model, work_dir, valid_images, valid_labels


def test_concept_model_learns_easy_concepts(trained):
    model, _, valid_images, valid_labels = trained
    metrics = [row["valid_metric"] for row in model.history_]
    assert model.best_valid_f1_ == pytest.approx(max(metrics))
    assert model.best_valid_f1_ > metrics[0] + 0.2 and model.best_valid_f1_ > 0.85
    assert sample_f1_at_threshold(model.predict_proba(valid_images), valid_labels) == pytest.approx(model.best_valid_f1_, abs=1e-6)
    assert model.cuis_ == CUIS


def test_probabilities_and_embeddings_come_from_one_pass_and_agree_with_separate_calls(trained):
    model, _, valid_images, _ = trained
    probabilities, embeddings = model.predict_proba_and_embed(valid_images)
    assert probabilities.shape == (32, len(CUIS)) and probabilities.dtype == np.float32
    assert embeddings.shape == (32, model.network_.num_features) and embeddings.dtype == np.float32
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    np.testing.assert_allclose(model.predict_proba(valid_images), probabilities, rtol=1e-6)
    np.testing.assert_allclose(model.embed(valid_images), embeddings, rtol=1e-6)


def test_concept_model_reloads_from_its_directory_alone(trained):
    model, work_dir, valid_images, _ = trained
    assert ConceptModel.is_trained(work_dir)
    loaded = ConceptModel.load(work_dir, device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(valid_images), model.predict_proba(valid_images))
    assert loaded.cuis_ == CUIS and loaded.best_valid_f1_ == model.best_valid_f1_
    checkpoint = torch.load(work_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["classes"] == CUIS and checkpoint["activation"] == "sigmoid"


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_trains_full_fine_tuning_with_class_weights(tmp_path, loss):
    images, labels, valid_images, valid_labels = _data()
    training = dataclasses.replace(CONFIG.global_model, loss=loss, class_weights=True, finetune="full", epochs=1, learning_rate=3e-3)
    model = ConceptModel(training, SIZE, "cpu").fit(images[:32], labels[:32], CUIS, valid_images[:16], valid_labels[:16], tmp_path)
    assert len(model.history_) == 1 and np.isfinite(model.history_[0]["train_loss"])


def test_dense_labels_are_accepted_and_column_mismatches_refused(tmp_path):
    images, labels, valid_images, valid_labels = _data()
    training = dataclasses.replace(CONFIG.global_model, epochs=1)
    model = ConceptModel(training, SIZE, "cpu").fit(images, labels.toarray(), CUIS, valid_images, valid_labels.toarray(), tmp_path)
    assert model.predict_proba(valid_images).shape == (32, 9)
    with pytest.raises(ValueError, match="9 columns but the vocabulary has 3"):
        ConceptModel(training, SIZE, "cpu").fit(images, labels, CUIS[:3], valid_images, valid_labels, tmp_path / "x")
    with pytest.raises(ValueError, match="one label row per image"):
        ConceptModel(training, SIZE, "cpu").fit(images, labels[:10], CUIS, valid_images, valid_labels, tmp_path / "y")


def test_validation_metric_is_the_official_sample_f1():
    probabilities = np.array([[0.9, 0.6, 0.1], [0.2, 0.4, 0.7], [0.1, 0.1, 0.1]])
    labels = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=np.float32))
    names = ["A", "B", "C"]
    predicted = {str(i): [names[j] for j in np.flatnonzero(row >= 0.5)] for i, row in enumerate(probabilities)}
    truth = {str(i): [names[j] for j in np.flatnonzero(row)] for i, row in enumerate(labels.toarray())}
    assert sample_f1_at_threshold(probabilities, labels) == pytest.approx(sample_f1(predicted, truth).score)
