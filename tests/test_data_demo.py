"""The synthetic demo dataset: valid layout, deterministic, and modality-dependent pixels and concepts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conceptclef.data.concepts import read_category_file, read_concept_file
from conceptclef.data.demo import FINDING_CUIS, MODALITIES, make_demo_dataset
from conceptclef.data.errors import DataError
from conceptclef.data.images import load_resized_array
from conceptclef.data.layout import discover_categories, list_image_folder, load_split


def test_layout_loads_with_load_split(demo_dataset: Path) -> None:
    train, valid = load_split(demo_dataset, "train"), load_split(demo_dataset, "valid")
    assert len(train) == 140 and len(valid) == 70
    assert discover_categories(demo_dataset) == sorted(MODALITIES)
    test = list_image_folder(demo_dataset / "test")
    assert len(test) == 50 and all(record.category is None for record in test)
    truth = read_concept_file(demo_dataset / "test_concepts.csv")
    categories = read_category_file(demo_dataset / "test_categories.csv")
    assert set(truth) == set(categories) == {record.image_id for record in test}
    assert not set(train.image_ids) & set(valid.image_ids) & set(truth)
    assert all(image_id.startswith("synpic") for image_id in train.image_ids)
    mean_concepts = np.mean([len(concepts) for concepts in train.concept_lists + valid.concept_lists])
    assert 4.0 <= mean_concepts <= 8.0


def test_same_seed_same_dataset_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_demo_dataset(tmp_path / name, n_train=12, n_valid=6, n_test=4, seed=seed, image_size=32)
    text = {name: (tmp_path / name / "train_concepts.csv").read_text() for name in "abc"}
    assert text["a"] == text["b"] != text["c"]
    first = sorted((tmp_path / "a" / "train").rglob("*.jpg"))[0]
    assert first.read_bytes() == (tmp_path / "b" / first.relative_to(tmp_path / "a")).read_bytes()


def test_rerun_replaces_a_demo_but_refuses_other_folders(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "d", n_train=10, n_valid=5, n_test=3, seed=0, image_size=32)
    make_demo_dataset(tmp_path / "d", n_train=8, n_valid=5, n_test=3, seed=1, image_size=32)
    assert len(load_split(tmp_path / "d", "train")) == 8  # no stale images from the first run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        make_demo_dataset(tmp_path / "mine", n_train=5, n_valid=5, n_test=5)


def test_concepts_depend_on_modality(demo_dataset: Path) -> None:
    split = load_split(demo_dataset, "train")
    by_category: dict[str, list[list[str]]] = {}
    for category, concepts in zip(split.categories, split.concept_lists):
        by_category.setdefault(category, []).append(concepts)
    counts = Counter(split.categories)
    assert counts["DRCT"] > counts["DRMR"] > counts["DRPE"]  # imbalanced like the real data
    # Every image carries its modality concepts (PET and CT for the combined DRCO), and only those,
    # so flat layouts can derive the category from the labels.
    own = {category: set(modality.cuis) for category, modality in MODALITIES.items()}
    every_modality = set().union(*own.values())
    assert all(every_modality & set(concepts) == own[category] for category, concepts in zip(split.categories, split.concept_lists))
    doppler = FINDING_CUIS["doppler"]
    assert all(category == "DRUS" for category, concepts in zip(split.categories, split.concept_lists) if doppler in concepts)


def test_modality_is_visible_in_the_pixels(demo_dataset: Path) -> None:
    """A linear classifier on 16x16 thumbnails already routes most images correctly."""
    from sklearn.linear_model import RidgeClassifier

    train, valid = load_split(demo_dataset, "train"), load_split(demo_dataset, "valid")

    def features(split):  # noqa: ANN001, ANN202
        return np.stack([load_resized_array(path, 16).astype(np.float32).ravel() / 255 for path in split.paths])

    train_x, valid_x = features(train), features(valid)
    predicted = RidgeClassifier().fit(train_x, train.categories).predict(valid_x)
    assert np.mean(predicted == np.array(valid.categories)) > 0.85


def test_flat_layouts_hold_the_same_images_and_labels(tmp_path: Path) -> None:
    """flat2025 and flat2026 write the 2020 demo's images without category folders, ID,CUIs files
    (one combined file and cui_mapping.csv in 2026): only the layout differs, so scores compare."""
    from conceptclef.data.concepts import read_cui_names
    from conceptclef.data.demo import COMBINED_CONCEPTS_FILE

    for layout in ("folders2020", "flat2025", "flat2026"):
        make_demo_dataset(tmp_path / layout, n_train=14, n_valid=7, n_test=4, seed=5, image_size=32, layout=layout)
    folders, flat = tmp_path / "folders2020", tmp_path / "flat2025"
    assert discover_categories(flat) == [] and (flat / "train_concepts.csv").read_text().startswith("ID,CUIs\n")
    for split in ("train", "valid"):
        reference = load_split(folders, split)
        for layout in ("flat2025", "flat2026"):
            loaded = load_split(tmp_path / layout, split)
            numbers = [image_id.removeprefix("synpic").rsplit("_", 1)[-1] for image_id in loaded.image_ids]
            assert numbers == [image_id.removeprefix("synpic") for image_id in reference.image_ids]
            assert loaded.concept_lists == reference.concept_lists
            assert all(record.category is None for record in loaded.records)
        same = next(iter(reference.records))
        assert (flat / split / same.path.name).read_bytes() == same.path.read_bytes()
    assert load_split(tmp_path / "flat2026", "valid").source == tmp_path / "flat2026" / COMBINED_CONCEPTS_FILE
    names = read_cui_names(tmp_path / "flat2026" / "cui_mapping.csv")
    assert names["C0040405"] == "X-Ray Computed Tomography" and names["C0024485"] == "Magnetic Resonance Imaging"
    with pytest.raises(DataError, match="unknown demo layout"):
        make_demo_dataset(tmp_path / "other", layout="flat2019")
