"""Frozen-backbone features shared between head-only models: computed once, exact, safely keyed, persisted."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import load_config
from conceptclef.pipeline.image_sets import SubsetImages
from conceptclef.router import ModalityRouter
from conceptclef.training.backbones import ImageClassifier, create_network
from conceptclef.training.batches import ImageBatches, batch_loader
from conceptclef.training.feature_extraction import ExtractionSettings, compute_features, extractor_identity
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.image_identity import image_source
from conceptclef.training.inference import DeviceSettings, run_forward, to_probabilities
from conceptclef.training.runtime import seed_everything
from synthetic_images import class_concepts, colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
HEAD = dataclasses.replace(CONFIG.global_model, finetune="head", epochs=3, early_stopping_patience=5, batch_size=16)
ROUTER = dataclasses.replace(CONFIG.router, finetune="head", epochs=3, early_stopping_patience=5, batch_size=16)
CPU = DeviceSettings(torch.device("cpu"))
EXTRACTION = ExtractionSettings(batch_size=16, device=CPU)
CUIS = [f"C{index}" for index in range(7)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def forward_rows(monkeypatch) -> list[int]:
    """Rows pushed through any backbone from now on (one entry per batch)."""
    calls: list[int] = []
    original = ImageClassifier.features

    def counted(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(ImageClassifier, "features", counted)
    return calls


def _memmapped(folder: Path, name: str, images: np.ndarray) -> np.memmap:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / name, images)
    return np.load(folder / name, mmap_mode="r")


def _network(seed: int = 0, backbone: str = "test_resnet", weights: str = "none") -> ImageClassifier:
    seed_everything(seed)
    return create_network(backbone, weights, 3, 0.0).eval()


def _unshared_probabilities(network: ImageClassifier, images: np.ndarray, activation: str) -> np.ndarray:
    """What prediction did before the store: one full forward pass per batch."""
    loader = batch_loader(ImageBatches(images), 16, shuffle=False)
    (probabilities,) = run_forward(lambda x: to_probabilities(network(x), activation), loader, len(images), CPU)
    return probabilities


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Memory-mapped train/valid images (like the image cache) with categories and concepts."""
    folder = tmp_path_factory.mktemp("cache")
    images, classes = colour_coded_images(48, SIZE, 3, seed=10)
    valid_images, valid_classes = colour_coded_images(24, SIZE, 3, seed=11)
    return {
        "train": _memmapped(folder, "train.npy", images),
        "valid": _memmapped(folder, "valid.npy", valid_images),
        "classes": classes,
        "valid_classes": valid_classes,
    }


def _category_subsets(data: dict) -> tuple[SubsetImages, sp.csr_matrix, SubsetImages, sp.csr_matrix]:
    members = np.flatnonzero(data["classes"] == 1)
    valid_members = np.flatnonzero(data["valid_classes"] == 1)
    return (
        SubsetImages(data["train"], members),
        class_concepts(data["classes"][members], 3),
        SubsetImages(data["valid"], valid_members),
        class_concepts(data["valid_classes"][valid_members], 3),
    )


# -- one pass per image across models ---------------------------------------------------------------
def test_backbone_runs_once_per_image_across_router_global_and_category_models(tmp_path, data, forward_rows):
    store = FeatureStore()
    category_images, category_labels, category_valid, category_valid_labels = _category_subsets(data)
    category = ConceptModel(HEAD, SIZE, "cpu", seed=0, feature_store=store)
    category.fit(category_images, category_labels, CUIS, category_valid, category_valid_labels, tmp_path / "category")
    category.predict_proba(data["valid"])
    assert sum(forward_rows) == len(category_images) + len(data["valid"])  # its subset of train, all of valid

    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=0, feature_store=store)
    names = [f"cat{c}" for c in data["classes"]]
    router.fit(data["train"], names, data["valid"], [f"cat{c}" for c in data["valid_classes"]], tmp_path / "router")
    router.predict_proba(data["valid"])
    assert sum(forward_rows) == len(data["train"]) + len(data["valid"])  # only the train rows the category lacked

    model = ConceptModel(HEAD, SIZE, "cpu", seed=0, feature_store=store)
    labels, valid_labels = class_concepts(data["classes"], 3), class_concepts(data["valid_classes"], 3)
    model.fit(data["train"], labels, CUIS, data["valid"], valid_labels, tmp_path / "global")
    model.predict_proba_and_embed(data["valid"])
    model.embed(data["train"])
    ConceptModel.load(tmp_path / "global", "cpu", feature_store=store).predict_proba(data["valid"])  # predict reloads
    assert sum(forward_rows) == len(data["train"]) + len(data["valid"])
    assert store.rows_computed == len(data["train"]) + len(data["valid"]) and store.rows_reused > 0


def test_fine_tuned_models_do_not_use_the_store(tmp_path, data):
    store = FeatureStore()
    full = dataclasses.replace(ROUTER, finetune="full", epochs=1)
    router = ModalityRouter(full, SIZE, "cpu", feature_store=store)
    router.fit(data["train"], [f"cat{c}" for c in data["classes"]], data["valid"], [f"cat{c}" for c in data["valid_classes"]], tmp_path)
    router.predict_proba(data["valid"])
    assert store.rows_computed == 0 and not store.memory.entries


# -- exactness ---------------------------------------------------------------------------------------
def test_probabilities_and_embeddings_equal_the_unshared_path(tmp_path, data):
    shared = FeatureStore()
    ModalityRouter(ROUTER, SIZE, "cpu", seed=0, feature_store=shared).fit(
        data["train"], [f"cat{c}" for c in data["classes"]], data["valid"], [f"cat{c}" for c in data["valid_classes"]], tmp_path / "r"
    )
    category_images, category_labels, category_valid, category_valid_labels = _category_subsets(data)
    fitted = {}
    for name, store in (("shared", shared), ("alone", FeatureStore(retain=False))):
        model = ConceptModel(HEAD, SIZE, "cpu", seed=0, feature_store=store)
        fitted[name] = model.fit(category_images, category_labels, CUIS, category_valid, category_valid_labels, tmp_path / name)
    valid = np.asarray(data["valid"])
    expected = _unshared_probabilities(fitted["alone"].network_, valid, "sigmoid")
    for model in fitted.values():
        probabilities, embeddings = model.predict_proba_and_embed(data["valid"])
        np.testing.assert_allclose(probabilities, expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(embeddings, compute_features(model.network_, valid, EXTRACTION), atol=1e-6, rtol=0)
    shared_history, alone_history = fitted["shared"].history_, fitted["alone"].history_
    assert [row["valid_metric"] for row in shared_history] == [row["valid_metric"] for row in alone_history]
    np.testing.assert_allclose([row["train_loss"] for row in shared_history], [row["train_loss"] for row in alone_history], atol=2e-6)


def test_subset_images_gather_the_right_rows(data):
    store = FeatureStore()
    network = _network()
    everything = compute_features(network, np.asarray(data["train"]), EXTRACTION)
    indices = np.array([40, 3, 3, 17, 0, 47, 22])  # unsorted, repeated
    subset = SubsetImages(data["train"], indices)
    np.testing.assert_allclose(store.features(network, subset, EXTRACTION), everything[indices], atol=1e-6, rtol=0)
    assert store.rows_computed == 6
    nested = SubsetImages(subset, np.array([6, 0, 1]))
    np.testing.assert_allclose(store.features(network, nested, EXTRACTION), everything[[22, 40, 3]], atol=1e-6, rtol=0)
    sliced = data["train"][5:30:5]  # a memmap view is rows of its file too
    np.testing.assert_allclose(store.features(network, sliced, EXTRACTION), everything[5:30:5], atol=1e-6, rtol=0)
    assert store.rows_computed == 6 + 5  # the nested subset needed nothing new
    np.testing.assert_allclose(store.features(network, data["train"], EXTRACTION), everything, atol=1e-6, rtol=0)
    assert store.rows_computed == 48


# -- keys ----------------------------------------------------------------------------------------------
def test_weights_backbone_and_image_size_change_the_keys(tmp_path):
    base = extractor_identity(_network(0), CPU)
    assert extractor_identity(_network(0), CPU) == base  # same weights: shared
    assert extractor_identity(_network(1), CPU) != base  # a random init from another seed
    assert extractor_identity(_network(0, backbone="test_efficientnet_gn"), CPU) != base
    assert extractor_identity(_network(0), DeviceSettings(torch.device("cpu"), amp=True)) != base  # other numerics
    weight_file = tmp_path / "backbone.pth"
    torch.save(_network(2).backbone.state_dict(), weight_file)
    from_file = extractor_identity(_network(0, weights=str(weight_file)), CPU)
    assert from_file == extractor_identity(_network(2), CPU)  # the weights decide, not where they came from
    state = _network(3).backbone.state_dict()
    torch.save(state, weight_file)  # the same path, other weights
    assert extractor_identity(_network(0, weights=str(weight_file)), CPU) not in (from_file, base)

    small, _ = colour_coded_images(4, 16, 3, seed=0)
    large, _ = colour_coded_images(4, 32, 3, seed=0)
    assert image_source(small).identity != image_source(large).identity
    assert image_source(small).identity == image_source(small.copy()).identity
    changed = small.copy()
    changed[2, 0, 0, 0] ^= 1
    assert image_source(changed).identity != image_source(small).identity
    mapped_small, mapped_large = _memmapped(tmp_path, "s.npy", small), _memmapped(tmp_path, "l.npy", large)
    assert image_source(mapped_small).identity != image_source(mapped_large).identity
    assert image_source(object()) is None  # unknown array-likes are computed, never shared


def test_a_rebuilt_image_cache_file_never_reuses_old_features(tmp_path):
    network = _network()
    store = FeatureStore(beside_images=True)
    first, _ = colour_coded_images(12, SIZE, 3, seed=0)
    second, _ = colour_coded_images(12, SIZE, 3, seed=1)
    store.features(network, _memmapped(tmp_path / "cache", "images.npy", first), EXTRACTION)
    assert list((tmp_path / "cache" / "features").glob("*.npz"))
    rebuilt = _memmapped(tmp_path / "cache", "images.npy", second)  # same path, new file (as data.cache does)
    np.testing.assert_allclose(
        store.features(network, rebuilt, EXTRACTION), compute_features(network, second, EXTRACTION), atol=1e-6, rtol=0
    )
    assert store.rows_computed == 24
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1  # the slot was replaced, not added to


# -- disk ----------------------------------------------------------------------------------------------
def test_features_on_disk_serve_a_new_store_without_the_backbone(tmp_path, data, forward_rows):
    network = _network()
    expected = FeatureStore(directory=tmp_path / "features").features(network, data["valid"], EXTRACTION)
    calls = len(forward_rows)
    again = FeatureStore(directory=tmp_path / "features")
    np.testing.assert_array_equal(again.features(network, data["valid"], EXTRACTION), expected)
    assert len(forward_rows) == calls and again.rows_computed == 0


def test_features_on_disk_serve_a_new_process(tmp_path, data):
    network = _network()
    FeatureStore(directory=tmp_path / "features").features(network, data["valid"], EXTRACTION)
    script = f"""
import sys, numpy as np, torch
from conceptclef.training.backbones import create_network
from conceptclef.training.feature_extraction import ExtractionSettings
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.inference import DeviceSettings
from conceptclef.training.runtime import seed_everything
seed_everything(0)
network = create_network("test_resnet", "none", 3, 0.0).eval()
store = FeatureStore(directory={str(tmp_path / "features")!r})
store.features(network, np.load({str(data["valid"].filename)!r}, mmap_mode="r"), ExtractionSettings(16, DeviceSettings(torch.device("cpu"))))
print(store.rows_computed, store.rows_reused)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == ["0", str(len(data["valid"]))]


def test_a_truncated_feature_file_is_recomputed_not_read(tmp_path, data):
    network = _network()
    folder = tmp_path / "features"
    expected = FeatureStore(directory=folder).features(network, data["valid"], EXTRACTION)
    (path,) = folder.glob("*.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    store = FeatureStore(directory=folder)
    with pytest.warns(RuntimeWarning, match="unusable feature file"):
        features = store.features(network, data["valid"], EXTRACTION)
    np.testing.assert_array_equal(features, expected)
    assert store.rows_computed == len(data["valid"])
    fresh = FeatureStore(directory=folder)  # the damaged file was replaced by a whole one
    fresh.features(network, data["valid"], EXTRACTION)
    assert fresh.rows_computed == 0 and not list(folder.glob("*.partial"))


def test_memory_stays_bounded_and_results_stay_right(data):
    network = _network()
    store = FeatureStore(max_bytes=1)  # keeps only the entry in use
    train = store.features(network, data["train"], EXTRACTION)
    valid = store.features(network, data["valid"], EXTRACTION)
    assert len(store.memory.entries) == 1
    np.testing.assert_array_equal(store.features(network, data["train"], EXTRACTION), train)  # recomputed
    assert store.rows_computed == 48 + 24 + 48 and valid.shape == (24, network.num_features)
