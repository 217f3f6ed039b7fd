"""ModalityRouter: learns an easy modality task, reports accuracy and confusion, reloads from its directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptclef.core.config import load_config
from conceptclef.router import ModalityRouter
from conceptclef.router.model import accuracy, confusion_matrix
from synthetic_images import colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
NAMES = np.array(["XR", "CT", "MR", "US"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    images, classes = colour_coded_images(64, SIZE, 4, seed=0)
    valid_images, valid_classes = colour_coded_images(32, SIZE, 4, seed=1)
    training = dataclasses.replace(CONFIG.router, epochs=4, early_stopping_patience=4)
    work_dir = tmp_path_factory.mktemp("router") / "router"
    router = ModalityRouter(training, SIZE, "cpu").fit(images, list(NAMES[classes]), valid_images, list(NAMES[valid_classes]), work_dir)
    return router, work_dir, valid_images, list(NAMES[valid_classes])


def test_router_learns_an_easy_modality_task(trained):
    router, _, valid_images, valid_categories = trained
    metrics = [row["valid_metric"] for row in router.history_]
    assert max(metrics) > metrics[0] or metrics[0] == 1.0
    assert router.valid_accuracy_ >= 0.9
    assert router.categories_ == ["CT", "MR", "US", "XR"]
    assert np.mean(np.array(router.predict(valid_images)) == np.array(valid_categories)) == pytest.approx(router.valid_accuracy_)


def test_router_probabilities_and_confusion(trained):
    router, _, valid_images, valid_categories = trained
    probabilities = router.predict_proba(valid_images)
    assert probabilities.shape == (32, 4) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert router.confusion_.shape == (4, 4) and router.confusion_.sum() == 32
    truth = [router.categories_.index(name) for name in valid_categories]
    np.testing.assert_array_equal(np.diag(router.confusion_).sum(), np.sum(np.argmax(probabilities, 1) == truth))
    assert router.predict_proba(valid_images[:0]).shape == (0, 4)


def test_router_reloads_from_its_directory_alone(trained):
    router, work_dir, valid_images, _ = trained
    assert ModalityRouter.is_trained(work_dir)
    loaded = ModalityRouter.load(work_dir, device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(valid_images), router.predict_proba(valid_images))
    assert loaded.categories_ == router.categories_
    np.testing.assert_array_equal(loaded.confusion_, router.confusion_)
    assert loaded.history_ == router.history_ and loaded.valid_accuracy_ == router.valid_accuracy_


def test_router_reads_memmaps_lazily(tmp_path, trained):
    router, _, valid_images, _ = trained
    path = tmp_path / "images.npy"
    np.save(path, valid_images)
    mapped = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(router.predict_proba(mapped), router.predict_proba(valid_images))


def test_router_refuses_bad_inputs(tmp_path):
    images, classes = colour_coded_images(8, SIZE, 2, seed=0)
    router = ModalityRouter(CONFIG.router, SIZE, "cpu")
    with pytest.raises(ValueError, match="never seen in training"):
        router.fit(images, ["CT"] * 8, images, ["MR"] * 8, tmp_path)
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\)"):
        router.fit(images[:, :16, :16], ["CT"] * 8, images, ["CT"] * 8, tmp_path)
    with pytest.raises(ValueError, match="one category per image"):
        router.fit(images, ["CT"] * 7, images, ["CT"] * 8, tmp_path)
    with pytest.raises(RuntimeError, match="not fitted"):
        router.predict_proba(images)


def test_accuracy_and_confusion_helpers():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(probabilities, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(confusion_matrix(probabilities, np.array([0, 1, 1]), 2), [[1, 0], [1, 1]])
