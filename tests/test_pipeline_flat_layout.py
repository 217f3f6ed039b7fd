"""Data without category folders (the ImageCLEF 2021-2026 layout): categories derived from the
modality CUIs train a router and per-category models as folders would; with the derivation off
(or no modality CUI) it is one category, no router to train, the global model serving it, and
the whole chain still runs; mixed layouts are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import TEST_CONFIG, invoke, train
from conceptclef.core.config import apply_overrides, load_config
from conceptclef.data.demo import make_demo_dataset
from conceptclef.data.errors import DataError
from conceptclef.pipeline.image_sets import UNCATEGORISED, load_training_sets
from conceptclef.router import ModalityRouter, SingleCategoryRouter, router_class_for



def flatten(source: Path, target: Path) -> Path:
    """The demo dataset with every train/valid image moved out of its category folder."""
    for split in ("train", "valid"):
        (target / split).mkdir(parents=True)
        for image in (source / split).glob("*/*.jpg"):
            shutil.copyfile(image, target / split / image.name)
    for name in ("train_concepts.csv", "valid_concepts.csv"):
        shutil.copyfile(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flat-data")
    make_demo_dataset(root / "categorised", n_train=120, n_valid=60, n_test=30, seed=2, image_size=48)
    flatten(root / "categorised", root / "flat")
    return root


NO_DERIVATION = "categories.modality_cuis={}"


def test_flat_folders_without_a_modality_mapping_are_one_category(demo):
    config = apply_overrides(load_config(TEST_CONFIG), [NO_DERIVATION])
    train, valid = load_training_sets(demo / "flat", config)
    assert {record.category for record in train.records + valid.records} == {UNCATEGORISED}
    assert len(train.records) == 120 and len(valid.records) == 60


def test_flat_folders_get_the_folder_categories_back_from_their_labels(demo):
    flat = load_training_sets(demo / "flat", load_config(TEST_CONFIG))
    folders = load_training_sets(demo / "categorised", load_config(TEST_CONFIG))
    for derived, truth in zip(flat, folders):
        assert dict(zip(derived.image_ids, derived.categories)) == dict(zip(truth.image_ids, truth.categories))


def test_a_split_mixing_flat_and_category_folders_is_refused(demo, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(demo / "categorised", mixed, ignore=shutil.ignore_patterns(".cache", "test"))
    moved = next((mixed / "valid").glob("*/*.jpg"))
    moved.rename(mixed / "valid" / moved.name)
    with pytest.raises(DataError, match=moved.name):
        load_training_sets(mixed, load_config(TEST_CONFIG))


def test_single_category_router_routes_everything_and_round_trips(tmp_path):
    router = SingleCategoryRouter().fit(["ALL"] * 3, ["ALL"], tmp_path / "router")
    assert SingleCategoryRouter.is_trained(tmp_path / "router")
    loaded = SingleCategoryRouter.load(tmp_path / "router")
    assert loaded.categories_ == router.categories_ == ["ALL"]
    assert loaded.predict_proba(np.zeros((4, 8, 8, 3), np.uint8)).tolist() == [[1.0]] * 4
    assert not SingleCategoryRouter.is_trained(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="2 categories"):
        SingleCategoryRouter().fit(["CT", "MR"], ["CT"], tmp_path / "two")
    with pytest.raises(ValueError, match="never seen in training: MR"):
        SingleCategoryRouter().fit(["CT"], ["CT", "MR"], tmp_path / "unseen")
    assert router_class_for(["ALL"]) is SingleCategoryRouter and router_class_for(["CT", "MR"]) is ModalityRouter


@pytest.mark.slow
def test_whole_chain_on_flat_data(demo, tmp_path):
    run, data = tmp_path / "run", demo / "flat"
    train(data, run, "--set", NO_DERIVATION)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["categories"] == [UNCATEGORISED] and manifest["fallback_categories"] == [UNCATEGORISED]
    assert not (run / "router" / "checkpoint.pt").exists()  # nothing was trained for routing
    assert "only category" in (run / f"category-{UNCATEGORISED}" / "fallback.json").read_text()
    submission = tmp_path / "submission.tsv"
    invoke("predict", "--run", run, "--images", demo / "categorised" / "test", "--out", submission)
    invoke("validate", submission, "--images", demo / "categorised" / "test")
    report = json.loads(invoke("evaluate", submission, demo / "categorised" / "test_concepts.csv", "--json"))
    assert report["n_images"] == 30 and report["score"] > 0.2
    output = invoke("ablation", "--run", run, "--out", tmp_path / "report")
    assert "stacked ensemble" in output and f"| {UNCATEGORISED} |" in output
    # Rerunning resumes: nothing is redone.
    stacker = (run / "ensemble" / "stacker.txt").stat().st_mtime_ns
    train(data, run, "--set", NO_DERIVATION)
    assert (run / "ensemble" / "stacker.txt").stat().st_mtime_ns == stacker
