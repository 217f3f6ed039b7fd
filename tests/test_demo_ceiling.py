"""The demo's ceiling: the generative story's own probabilities, re-drawn from demo.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conceptclef.data.demo import FINDING_CUIS, MODALITIES, rare_pool, sample_demo_images, visible_concept_probabilities
from conceptclef.data.errors import DataError
from demo_ceiling import demo_ceiling


def test_visible_probabilities_follow_the_story():
    images = sample_demo_images(30, 10, 10, np.random.default_rng(4))["train"]
    rare = rare_pool(50)
    with_finding = next(image for image in images if image.findings)
    probabilities = visible_concept_probabilities(with_finding, rare)
    assert all(probabilities[cui] == 1.0 for cui in MODALITIES[with_finding.category].cuis)
    assert all(probabilities[FINDING_CUIS[finding]] == 1.0 for finding in with_finding.findings)
    assert all(0.0 < value <= 1.0 for value in probabilities.values())
    # Every concept an image can carry has a probability (nothing is impossible that happens).
    assert all(set(image.cuis) <= set(visible_concept_probabilities(image, rare)) for image in images)


def test_ceiling_of_a_written_demo_is_high_but_not_perfect(demo_dataset: Path):
    ceiling = demo_ceiling(demo_dataset)
    assert ceiling["images"] == 50
    assert 0.6 < ceiling["expected_f1_decoding"] < 0.9
    assert 0.6 < ceiling["best_single_threshold"] < 0.9


def test_ceiling_refuses_an_edited_concept_file(demo_dataset: Path, tmp_path: Path):
    copy = tmp_path / "DATA"
    shutil.copytree(demo_dataset, copy, ignore=shutil.ignore_patterns("train", "valid", "test", ".cache"))
    lines = (copy / "test_concepts.csv").read_text().splitlines()
    lines[0] = lines[0].split("\t")[0] + "\tC0000001"
    (copy / "test_concepts.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="test_concepts.csv"):
        demo_ceiling(copy)
