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
    (one combined file and cui_mapping.csv in 2026): only the layout differs, so scores compare.
    Flat layouts default to realistic labels; folders2020 given the same shares holds the same images."""
    from conceptclef.data.concepts import read_cui_names
    from conceptclef.data.demo import COMBINED_CONCEPTS_FILE, DemoShares

    for layout in ("folders2020", "flat2025", "flat2026"):
        shares = DemoShares.realistic() if layout == "folders2020" else None
        make_demo_dataset(tmp_path / layout, n_train=14, n_valid=7, n_test=4, seed=5, image_size=32, layout=layout, shares=shares)
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


def _images_and_labels(root: Path) -> dict[str, tuple[bytes, tuple[str, ...], str]]:
    """Every train/valid image's bytes, labels and folder category, by ID."""
    result = {}
    for split in ("train", "valid"):
        loaded = load_split(root, split)
        for record, cuis in zip(loaded.records, loaded.concept_lists):
            result[record.image_id] = (record.path.read_bytes(), tuple(cuis), str(record.category))
    return result


def test_realistic_labels_change_only_the_drawn_images(tmp_path: Path) -> None:
    """The realistic draws use their own generator: with every share at 0 (the folders2020 default)
    the images are the plain story's, and with realistic shares every image that is not a composite
    keeps its pixels (only its labels may change), so the default demo is unchanged."""
    from conceptclef.data.demo import MODALITY_CUIS, DemoShares

    plain = make_demo_dataset(tmp_path / "plain", n_train=80, n_valid=40, n_test=10, seed=2, image_size=32)
    assert plain["shares"] == {"fused_pet_ct": 0.0, "no_modality": 0.0, "composite": 0.0}
    assert plain["labels"] == {"fused_pet_ct": 0, "no_modality": 0, "composite": 0}
    zero = make_demo_dataset(tmp_path / "zero", n_train=80, n_valid=40, n_test=10, seed=2, image_size=32, layout="flat2025", shares=DemoShares())
    real = make_demo_dataset(tmp_path / "real", n_train=80, n_valid=40, n_test=10, seed=2, image_size=32, layout="folders2020",
                             shares=DemoShares(fused_pet_ct=1.0, no_modality=0.2, composite=0.2))
    assert zero["labels"]["composite"] == 0
    before, flat_zero, after = (_images_and_labels(tmp_path / name) for name in ("plain", "zero", "real"))
    assert {key: value[:2] for key, value in before.items()} == {key: value[:2] for key, value in flat_zero.items()}
    assert before.keys() == after.keys()
    composites = no_modality = fused = 0
    for image_id, (pixels, cuis, category) in after.items():
        old_pixels, old_cuis, old_category = before[image_id]
        named = MODALITY_CUIS.intersection(cuis)
        no_modality += not named
        if pixels == old_pixels:  # not a composite: same category, labels minus modality or plus CT
            assert category == old_category
            assert set(cuis) - set(old_cuis) <= {MODALITIES["DRCT"].cuis[0]}
            if category == "DRPE" and named:
                assert named == {MODALITIES["DRPE"].cuis[0], MODALITIES["DRCT"].cuis[0]}  # fused_pet_ct = 1.0
                fused += 1
        else:  # a composite: filed DRCO, both panels' concepts, two modalities unless dropped
            composites += 1
            assert category == "DRCO" and set(old_cuis) - MODALITY_CUIS <= set(cuis)
            assert not named or len({category for category, modality in MODALITIES.items() if set(modality.cuis) <= named and category != "DRCO"}) >= 2
    assert 12 <= composites <= 40 and 12 <= no_modality <= 40 and fused >= 2
    assert after == _images_and_labels(tmp_path / "real")  # deterministic
    assert real["labels"]["composite"] >= composites


def test_shares_are_checked_and_named(tmp_path: Path) -> None:
    from conceptclef.data.demo import DemoShares

    with pytest.raises(DataError, match="share no_modality = -0.1 must be between 0 and 1"):
        make_demo_dataset(tmp_path / "bad", shares=DemoShares(no_modality=-0.1))
    assert not (tmp_path / "bad").exists()
    assert DemoShares.for_layout("folders2020") == DemoShares() and DemoShares.for_layout("flat2026") == DemoShares.realistic()


def test_make_demo_flags_choose_the_shares(tmp_path: Path) -> None:
    """--realistic / --plain override the layout's default; a share flag overrides one share."""
    import json

    from cli_helpers import invoke

    def shares(*args: object) -> dict:
        return json.loads(invoke("make-demo", tmp_path / "d", "--train", 8, "--valid", 4, "--test", 2, "--image-size", 32, *args))["shares"]

    assert shares() == {"fused_pet_ct": 0.0, "no_modality": 0.0, "composite": 0.0}
    assert shares("--layout", "flat2025") == {"fused_pet_ct": 0.5, "no_modality": 0.1, "composite": 0.08}
    assert shares("--realistic", "--composite-share", 0.3) == {"fused_pet_ct": 0.5, "no_modality": 0.1, "composite": 0.3}
    assert shares("--layout", "flat2026", "--plain", "--fused-share", 0.25)["fused_pet_ct"] == 0.25
