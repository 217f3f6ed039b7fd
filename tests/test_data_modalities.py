"""Categories from modality CUIs: one category, several (the combined category), none, and
mappings from the config (an OCT category needs no code); and their assignment to flat splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conceptclef.core.config import CategoryConfig, ConfigError, load_config
from conceptclef.data.layout import ImageRecord, LabelledSplit
from conceptclef.data.modalities import UNROUTED, ModalityMapping, derive_categories
from conceptclef.pipeline.image_sets import UNCATEGORISED, assign_categories

CT, MR, PET, OCT, CHEST = "C0040405", "C0024485", "C0032743", "C0920367", "C0817096"


def mapping(**changes) -> ModalityMapping:
    return ModalityMapping.from_config(CategoryConfig(**changes))


def test_one_modality_gives_its_category_several_the_combined_one_none_unrouted():
    derived = derive_categories([[CHEST, CT], [MR], [PET, CT], [CHEST], [OCT]], mapping())
    assert derived.categories == ["DRCT", "DRMR", "DRCO", UNROUTED, UNROUTED]
    assert derived.counts == {"DRCT": 1, "DRMR": 1, "DRCO": 1, UNROUTED: 2}
    assert (derived.with_several, derived.with_none) == (1, 2)
    assert derived.summary() == "DRCO 1, DRCT 1, DRMR 1; 1 with several modalities, 2 with none; 2 left out of router and category training"


def test_several_modalities_can_be_left_out_of_routing_instead():
    derived = derive_categories([[PET, CT], [CT, CT]], mapping(several=""))
    assert derived.categories == [UNROUTED, "DRCT"]
    assert derived.with_several == 1


def test_two_cuis_of_one_category_are_one_modality():
    grouped = mapping(modality_cuis={"CTPET": [CT, PET], "DRMR": [MR]})
    assert derive_categories([[CT, PET], [PET], [CT, MR]], grouped).categories == ["CTPET", "CTPET", "DRCO"]


def test_an_oct_category_comes_from_the_config_file(tmp_path: Path):
    path = tmp_path / "oct.toml"
    path.write_text(
        '[categories]\nseveral = "MIXED"\n\n[categories.modality_cuis]\nDRCT = ["C0040405"]\nOCT = ["c0920367"]\n'
    )
    config = load_config(path)
    assert config.categories.modality_cuis == {"DRCT": [CT], "OCT": ["c0920367"]}  # the table replaces the defaults
    derived = derive_categories([[OCT], [CT, OCT], [MR]], ModalityMapping.from_config(config.categories))
    assert derived.categories == ["OCT", "MIXED", UNROUTED]


@pytest.mark.parametrize(
    "table, message",
    [
        ('DRCT = ["C004"]', "not a CUI"),
        ('DRCT = ["C0040405"]\nDRMR = ["C0040405"]', "under both DRCT and DRMR"),
        ('DRCT = "C0040405"', "must be an array of strings"),
    ],
)
def test_a_bad_mapping_is_refused_before_any_image_is_read(tmp_path: Path, table: str, message: str):
    path = tmp_path / "bad.toml"
    path.write_text(f"[categories.modality_cuis]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        ModalityMapping.from_config(load_config(path).categories)


def test_the_combined_category_must_not_be_a_modality_category():
    with pytest.raises(ConfigError, match="several"):
        mapping(several="DRCT")


def split(name: str, labels: dict[str, list[str]], category: str | None = None) -> LabelledSplit:
    records = tuple(ImageRecord(image_id, Path(f"/data/{name}/{image_id}.jpg"), category) for image_id in labels)
    return LabelledSplit(name, records, labels)


def test_flat_splits_get_derived_categories_and_the_counts_are_logged(caplog):
    train = split("train", {"a": [CT], "b": [MR], "c": [CHEST], "d": [PET, CT]})
    valid = split("valid", {"e": [CT], "f": [PET], "g": []})  # DRPE has no training image: left out of routing
    with caplog.at_level(logging.INFO, logger="conceptclef"):
        train, valid = assign_categories([train, valid], load_config(None))
    assert train.categories == ["DRCT", "DRMR", UNROUTED, "DRCO"]
    assert valid.categories == ["DRCT", UNROUTED, UNROUTED]
    expected = "DRCO 1, DRCT 1, DRMR 1; 1 with several modalities, 1 with none; 1 left out of router and category training"
    assert f"train: categories from modality CUIs: {expected}" in caplog.text
    assert "DRPE have no training image" in caplog.text


def test_folder_categories_are_kept_and_unlabelled_modalities_give_one_category():
    folders = [split("train", {"a": [CT]}, category="DRXR")]
    assert assign_categories(folders, load_config(None)) == folders  # the 2020 layout: the folder decides
    no_modality = assign_categories([split("train", {"a": [CHEST]}), split("valid", {"b": [CT]})], load_config(None))
    assert [s.categories for s in no_modality] == [[UNCATEGORISED], [UNCATEGORISED]]


def test_specialists_on_every_image_naming_their_modality():
    """specialist_images = "modality": a PET/CT image trains the PET and the CT model; the combined
    category keeps its own images; without the mapping, a category model has its category's images."""
    import numpy as np

    from conceptclef.pipeline.image_sets import ImageSet
    from conceptclef.pipeline.stages.network_images import category_members as _members

    labels = {"a": [CT], "b": [PET, CT], "c": [PET], "d": [CHEST], "e": [MR]}
    (train,) = assign_categories([split("train", labels)], load_config(None))
    images = ImageSet(list(train.records), np.zeros((5, 4, 4, 3), np.uint8), train.concept_lists)
    by_modality = mapping()
    assert by_modality.cuis_by_category()["DRPE"] == [PET] and by_modality.names_category([PET, CT], "DRCT")
    assert list(_members(images, "DRCT")) == [0] and list(_members(images, "DRCT", by_modality)) == [0, 1]
    assert list(_members(images, "DRPE", by_modality)) == [1, 2]
    assert list(_members(images, "DRCO", by_modality)) == list(_members(images, "DRCO")) == [1]


def test_priority_decides_images_naming_several_modalities():
    prefer_pet = mapping(priority=["DRPE"])
    assert prefer_pet.category_of([PET, CT]) == "DRPE" and prefer_pet.category_of([CT, MR]) == "DRCO"
    assert mapping().category_of([PET, CT]) == "DRCO"
    with pytest.raises(ConfigError, match="priority names 'DRZZ'"):
        mapping(priority=["DRZZ"])
    from conceptclef.core.config import apply_overrides

    assert apply_overrides(load_config(None), ['categories.priority=["DRPE"]']).categories.priority == ["DRPE"]
    with pytest.raises(ConfigError, match="categories.priority must be an array of strings"):
        apply_overrides(load_config(None), ["categories.priority=[1]"])
