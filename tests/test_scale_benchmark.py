"""benchmarks/scale_2026.py: the 2026-shaped data it writes and, at a tiny scale, the table it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

import scale_2026
from conceptclef.core.config import IMAGECLEF_MODALITY_CUIS
from conceptclef.data.concepts import read_concept_file, read_cui_names
from conceptclef.data.layout import find_combined_concept_file

REPOSITORY = Path(__file__).resolve().parent.parent
STAGES = ("train-all", "predict", "validate", "evaluate", "ablation")


def test_split_sizes_follow_the_scale() -> None:
    assert scale_2026.split_sizes(1.0) == {"train": 97_000, "valid": 19_240, "test": 15_000}
    assert scale_2026.split_sizes(0.25) == {"train": 24_250, "valid": 4_810, "test": 3_750}


def test_concepts_are_2026_shaped() -> None:
    categories, lists = scale_2026.concept_lists(20_000, scale_2026.FULL_CUIS, np.random.default_rng(0))
    modality = {cui for cuis in IMAGECLEF_MODALITY_CUIS.values() for cui in cuis}
    assert all(modality & set(cuis) for cuis in lists)  # every image names its modality
    assert all(set(scale_2026.modality_cuis(category)) <= set(cuis) for category, cuis in zip(categories, lists))
    assert 3.5 < np.mean([len(cuis) for cuis in lists]) < 4.5
    counts = Counter(cui for cuis in lists for cui in cuis if cui not in modality)
    assert len(counts) <= scale_2026.FULL_CUIS - len(modality)
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 20 * ranked[len(ranked) // 2]  # a long Zipf tail, not uniform use


def test_dataset_is_read_by_the_pipeline_readers(tmp_path: Path) -> None:
    sizes = scale_2026.write_dataset(tmp_path / "data", 0.001, seed=0)
    combined = find_combined_concept_file(tmp_path / "data")
    assert combined is not None
    by_id = read_concept_file(combined)
    assert sum(image_id.count("_train_") for image_id in by_id) == sizes["train"]
    assert sum(image_id.count("_valid_") for image_id in by_id) == sizes["valid"]
    assert len(read_concept_file(tmp_path / "data" / "test_concepts.csv")) == sizes["test"]
    assert len(list((tmp_path / "data" / "test").glob("*.jpg"))) == sizes["test"]
    assert read_cui_names(tmp_path / "data" / "cui_mapping.csv")


def test_tiny_run_prints_every_stage_and_a_valid_upload(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "scale_2026.py"), "--scale", "0.002", "--work", str(tmp_path)],
        capture_output=True, text=True, cwd=REPOSITORY, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"submission\.zip: valid \(30 images\)", result.stdout)
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in STAGES:
            rows[cells[0]] = cells
    assert list(rows) == list(STAGES)
    for name, (_, wall, cpu, peak, anonymous, disk) in rows.items():
        assert re.fullmatch(r"(\d+ min )?\d+(\.\d)? s", wall) and re.fullmatch(r"(\d+ min )?\d+(\.\d)? s", cpu)
        assert 0.0 < float(peak) < 6.0, f"{name}: peak RSS {peak} GB"
        assert 0.0 < float(anonymous) <= float(peak) + 0.01, f"{name}: peak anonymous {anonymous} GB"
        assert len(disk.split(" / ")) == 4
    image_cache, features, run, _ = (float(value) for value in rows["train-all"][5].split(" / "))
    assert image_cache > 0 and features > 0 and run > 0  # train-all wrote the caches and the run
    assert (tmp_path / "outputs" / "submission.zip").is_file()  # a few KB here: the table shows 0.0 MB
    for name in STAGES:  # each stage's log and its memory over time, to line a peak up with the log
        assert (tmp_path / "memory" / f"{name}.log").is_file()
        samples = (tmp_path / "memory" / f"{name}.tsv").read_text().splitlines()
        assert samples[0] == "time\tresident_gb\tanonymous_gb" and len(samples) > 1
        clock, resident, anonymous = samples[-1].split("\t")
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d", clock) and 0.0 < float(anonymous) <= float(resident)
    assert "run" in (tmp_path / "memory" / "train-all.log").read_text()
