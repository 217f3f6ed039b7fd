"""ModalityCuiRouter: one sigmoid per modality CUI, categories read from them; denoises PET images
labelled CT; reloads through ModalityRouter.load; category probabilities from CUI probabilities."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptclef.core.config import load_config
from conceptclef.router import ModalityRouter
from conceptclef.router.modality_cuis import ModalityCuiRouter, category_probabilities, modality_targets
from synthetic_images import colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
PET, CT, XR = "C0032743", "C0040405", "C1306645"
CATEGORY_CUIS = {"DRPE": [PET], "DRCT": [CT], "DRXR": [XR]}
CATEGORIES = ["DRCO", "DRCT", "DRPE", "DRXR"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_category_probabilities_from_independent_cuis() -> None:
    cuis = [CT, PET, XR]
    probs = np.array([[0.3, 0.95, 0.01], [0.9, 0.9, 0.0], [0.0, 0.0, 0.0], [0.9, 0.01, 0.01]])
    result = category_probabilities(probs, cuis, CATEGORY_CUIS, CATEGORIES, "DRCO")
    assert result.shape == (4, 4) and result.dtype == np.float32
    np.testing.assert_allclose(result.sum(axis=1), 1.0, atol=1e-5)
    # a PET image labelled CT 30% of the time: PET alone 0.95 * 0.7 * 0.99 beats both 0.95 * 0.3 * 0.99
    assert [CATEGORIES[i] for i in np.argmax(result, axis=1)] == ["DRPE", "DRCO", "DRCO", "DRCT"][:2] + [CATEGORIES[int(np.argmax(result[2]))], "DRCT"]
    alone_pet = 0.95 * 0.7 * 0.99
    both = 0.95 * 0.3 * 0.99 + 0.95 * 0.7 * 0.01 + 0.3 * 0.05 * 0.01 + 0.3 * 0.95 * 0.01
    np.testing.assert_allclose(result[0, 2] / result[0, 0], alone_pet / both, rtol=1e-3)
    # without the combined category, the mass of "several" is left out before renormalising
    without = category_probabilities(probs, cuis, CATEGORY_CUIS, ["DRCT", "DRPE", "DRXR"], "DRCO")
    np.testing.assert_allclose(without.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(modality_targets([[PET, "C0000726"], [], [CT, PET]], [CT, PET]), [[0, 1], [0, 0], [1, 1]])


def _images_and_labels(count: int, seed: int, ct_share_on_pet: float) -> tuple[np.ndarray, list[list[str]]]:
    """Three colour-coded classes (PET, CT, XR); a share of PET images also lists CT, every image a region."""
    images, classes = colour_coded_images(count, SIZE, 3, seed=seed)
    rng = np.random.default_rng(seed)
    labels = []
    for cls in classes:
        cuis = [[PET], [CT], [XR]][int(cls)] + ["C0000726"]
        if cls == 0 and rng.random() < ct_share_on_pet:
            cuis.append(CT)
        labels.append(cuis)
    return images, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    images, labels = _images_and_labels(90, 0, 0.3)
    valid_images, valid_labels = _images_and_labels(45, 1, 0.3)
    training = dataclasses.replace(CONFIG.router, epochs=6, early_stopping_patience=6)
    work_dir = tmp_path_factory.mktemp("cui-router") / "router"
    router = ModalityCuiRouter(training, SIZE, "cpu").fit_cuis(
        images, labels, valid_images, valid_labels, {**CATEGORY_CUIS, "DRUS": ["C0041618"]}, CATEGORIES, "DRCO", work_dir
    )
    return router, work_dir, valid_images, valid_labels


def test_cui_router_learns_each_modality_and_routes_pet_labelled_ct_to_pet(trained) -> None:
    router, _, valid_images, valid_labels = trained
    assert router.cuis_ == [PET, CT, XR]  # DRUS's CUI is on no training image: no output for it
    assert router.categories_ == CATEGORIES
    cui_probs = router.predict_cui_proba(valid_images)
    probabilities = router.predict_proba(valid_images)
    assert cui_probs.shape == (45, 3) and probabilities.shape == (45, 4)
    np.testing.assert_allclose(probabilities, router.categories_from(cui_probs), atol=1e-6)
    pet = np.array([PET in labels for labels in valid_labels])
    # every PET image goes to PET, those labelled PET/CT too: the head learnt CT is rare on PET
    assert np.mean(np.array(router.predict(valid_images))[pet] == "DRPE") >= 0.9
    assert 0.0 < router.valid_accuracy_ < 1.0  # PET/CT labels count as DRCO truth: accuracy below 1
    assert router.confusion_.shape == (4, 4) and router.confusion_.sum() == 45


def test_cui_router_reloads_through_the_router_class(trained) -> None:
    router, work_dir, valid_images, _ = trained
    loaded = ModalityRouter.load(work_dir, device="cpu")
    assert isinstance(loaded, ModalityCuiRouter)
    assert loaded.categories_ == router.categories_ and loaded.cuis_ == router.cuis_ and loaded.several_ == "DRCO"
    np.testing.assert_allclose(loaded.predict_proba(valid_images), router.predict_proba(valid_images), atol=1e-5)
    assert loaded.valid_accuracy_ == pytest.approx(router.valid_accuracy_)


def test_cui_router_refuses_fewer_than_two_modalities(tmp_path: Path) -> None:
    images, _ = _images_and_labels(10, 0, 0.0)
    with pytest.raises(ValueError, match="fewer than two modality CUIs"):
        ModalityCuiRouter(CONFIG.router, SIZE, "cpu").fit_cuis(
            images, [[PET]] * 10, images, [[PET]] * 10, CATEGORY_CUIS, CATEGORIES, "DRCO", tmp_path / "router"
        )
