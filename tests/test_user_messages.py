"""Refusals and messages a careless user meets (issue 19): each says what is wrong and what to do,
in one line, before any long work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cli_helpers import TEST_CONFIG, cli_error, invoke
from conceptclef.core.config import ConfigError, apply_overrides, load_config
from conceptclef.data.concepts import read_cui_list
from conceptclef.data.errors import ConceptFileError
from conceptclef.data.layout import ImageRecord, LabelledSplit
from conceptclef.data.submission import write_submission, write_upload_zip
from conceptclef.ensemble.stacker import ConceptStacker, default_threads
from conceptclef.pipeline.image_sets import assign_categories
from conceptclef.training.estimator import config_section_of, run_label
from conceptclef.training.loop import RunSettings, _rate_key_name


def test_config_naming_a_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    assert str(error.value) == f"{tmp_path}: is a folder; --config takes a TOML file, e.g. configs/cpu.toml"


def test_min_concept_count_above_every_concept_is_refused_before_training(demo_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    message = cli_error(
        "train-all", "--data", demo_dataset, "--out", run, "--config", TEST_CONFIG, "--set", "data.min_concept_count=100000"
    )
    assert message.startswith(
        "error: --set data.min_concept_count=100000: data.min_concept_count = 100000 leaves no concept to learn: the most frequent, C"
    )
    assert message.endswith("of the 140 training images; lower it")
    assert not (run / "router").exists()


def test_an_unusable_cache_dir_names_the_key(demo_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = cli_error(
        "train-all", "--data", demo_dataset, "--out", tmp_path / "run", "--config", TEST_CONFIG, "--set", f"data.cache_dir='{blocker}/cache'"
    )
    assert message == f"error: data.cache_dir = '{blocker}/cache': cannot write the image cache there (Not a directory); choose another folder"


def _split(name: str, concept_lists: list[list[str]]) -> LabelledSplit:
    records = tuple(ImageRecord(f"{name}{index}", Path(f"{name}{index}.jpg")) for index in range(len(concept_lists)))
    return LabelledSplit(name, records, {record.image_id: concepts for record, concepts in zip(records, concept_lists)})


def test_a_modality_cui_no_training_image_carries_is_named(caplog: pytest.LogCaptureFixture) -> None:
    config = apply_overrides(
        load_config(TEST_CONFIG), ['categories.modality_cuis={DRCT = ["C0040405"], DRMR = ["C0024485", "C0024484"]}']
    )
    train = _split("train", [["C0040405"], ["C0024485"], ["C0040405", "C0000001"]])
    valid = _split("valid", [["C0040405"], ["C0024485"]])
    with caplog.at_level(logging.INFO, logger="conceptclef"):
        assign_categories([train, valid], config)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        "[categories.modality_cuis] DRMR: C0024484 is on no training image, so it derives no DRMR image (a typo, or another edition's CUI?)"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="conceptclef"):
        assign_categories([train, valid], config, announce=False)  # the same data at another image size: said once
    assert caplog.records == []


@pytest.mark.parametrize(
    "work_dir, section, key",
    [
        ("router", "router", "router.learning_rate"),
        ("global", "global_model", "global_model.learning_rate"),
        ("category-DRCT", "category_model", "category_model.learning_rate"),
        ("global-lite1", "extra_global_models (name = 'lite1')", "learning_rate of extra_global_models (name = 'lite1')"),
    ],
)
def test_a_divergence_names_the_real_config_key(work_dir: str, section: str, key: str) -> None:
    assert config_section_of(work_dir) == section
    settings = RunSettings(torch.device("cpu"), label=run_label("concepts", work_dir), config_section=section)
    assert _rate_key_name(settings) == key  # what the loop's divergence errors tell the user to lower


def test_networks_are_named_once_in_logs_and_curves() -> None:
    assert run_label("router", "router") == "router"
    assert run_label("concepts", "global") == "concepts global"


def test_evaluate_reads_the_upload_zip_validate_takes(tmp_path: Path) -> None:
    truth = tmp_path / "gt.csv"
    truth.write_text("ID,CUIs\nimg1,C0040405;C0000001\nimg2,C1306645\n")
    submission = tmp_path / "submission.csv"
    write_submission(submission, {"img1": ["C0040405"], "img2": ["C1306645"]}, format="2026")
    upload = write_upload_zip(submission, tmp_path / "submission.zip")
    from_csv = invoke("evaluate", submission, truth)
    assert invoke("evaluate", upload, truth) == from_csv
    assert from_csv.splitlines()[0] == "F1 0.8333 over 2 images"


def test_evaluate_subset_that_scores_no_image_says_n_a(tmp_path: Path) -> None:
    truth = tmp_path / "gt.csv"
    truth.write_text("ID,CUIs\nimg1,C0000001\n")
    submission = tmp_path / "submission.csv"
    write_submission(submission, {"img1": ["C0000001"]}, format="2025")
    subset = tmp_path / "subset.txt"
    subset.write_text("C0040405\n")
    lines = invoke("evaluate", submission, truth, "--subset", subset).splitlines()
    assert lines[1] == f"secondary F1 n/a: no image of the ground truth has one of the 1 CUIs ({subset})"
    subset.write_text("CUI\n")
    with pytest.raises(ConceptFileError, match="lists no CUI"):
        read_cui_list(subset)
    assert cli_error("evaluate", submission, truth, "--subset", subset) == (
        f"error: {subset}: lists no CUI (one per line, or a CSV whose first column holds them)"
    )


def test_a_small_stacking_table_is_boosted_on_one_thread() -> None:
    """OpenMP's per-round synchronisation made each round of a 1,895-pair table 16x slower on two
    busy cores than on one: the demo's cross-fit went from seconds to minutes."""
    assert default_threads(1_895) == 1
    assert ConceptStacker()._lightgbm_params(1_895)["num_threads"] == 1
    assert default_threads(None) == default_threads(10_000_000) >= 1
