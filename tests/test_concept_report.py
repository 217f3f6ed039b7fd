"""The per-concept report by hand: frequency bands, support, F1, average precision, names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.data.concepts import read_cui_names
from conceptclef.data.errors import ConceptFileError
from conceptclef.pipeline.stages.concept_report import band_summary, band_summary_markdown, concept_report, frequency_bands

CUIS = ["C0000001", "C0000002", "C0000003", "C0000004"]


def test_bands_split_the_training_labels_at_half_and_ninety_percent() -> None:
    # shares of all labels: 0.5, 0.3, 0.12, 0.08 -> labels before each: 0, 0.5, 0.8, 0.92
    assert frequency_bands(np.array([0.30, 0.50, 0.12, 0.08])).tolist() == ["body", "head", "body", "tail"]
    assert frequency_bands(np.array([0.2, 0.2, 0.2, 0.2, 0.2])).tolist() == ["head", "head", "head", "body", "body"]


def test_concept_rows_by_hand() -> None:
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=bool))
    decisions = sp.csr_matrix(np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool))
    probs = sp.csr_matrix(np.array([[0.9, 0.4, 0.6, 0], [0.8, 0.1, 0, 0], [0.2, 0.7, 0, 0], [0.3, 0, 0, 0]]))
    report = concept_report(CUIS, decisions, probs, truth, np.array([0.55, 0.37, 0.05, 0.03]), names={"C0000001": "angiogram"})
    assert list(report["cui"]) == CUIS and list(report["band"]) == ["head", "body", "tail", "tail"]
    assert list(report["name"]) == ["angiogram", "", "", ""]
    first = report.iloc[0]  # support 3, predicted 2, both right: P 1, R 2/3, F1 0.8
    assert (first["support"], first["predicted"], first["true_positives"]) == (3, 2, 2)
    assert first["f1"] == pytest.approx(0.8) and first["recall"] == pytest.approx(2 / 3)
    # AP of C0000001: scores 0.9 (+), 0.8 (+), 0.3 (+), 0.2 (-) -> every positive ranked first: 1
    assert first["average_precision"] == pytest.approx(1.0)
    # C0000002: positives scored 0.4 and 0.7, negatives 0.1 and 0 -> AP 1; F1 2*1/(2+1)
    assert report.iloc[1]["f1"] == pytest.approx(2 / 3) and report.iloc[1]["average_precision"] == pytest.approx(1.0)
    third = report.iloc[2]  # never true, predicted once: F1 0, no AP
    assert third["f1"] == 0 and np.isnan(third["average_precision"])
    assert np.isnan(report.iloc[3]["f1"])  # neither true nor predicted
    summary = band_summary(report)
    assert summary.set_index("band")["concepts"].to_dict() == {"head": 1, "body": 1, "tail": 2}
    assert summary.set_index("band").loc["tail", "concepts_with_support"] == 0
    text = band_summary_markdown(summary, "test images")
    assert "| head | 1 | 55.00%-55.00% | 1 | 3 | 0.8000 | 1.0000 |" in text and "first 50% of training labels" in text


def test_cui_names_file(tmp_path: Path) -> None:
    path = tmp_path / "cui_mapping.csv"
    path.write_text('CUI,Canonical name\nC0040405,"X-Ray Computed Tomography"\nc0024485,"Magnetic Resonance Imaging, brain"\n')
    assert read_cui_names(path) == {"C0040405": "X-Ray Computed Tomography", "C0024485": "Magnetic Resonance Imaging, brain"}
    path.write_text("CUI,name\nC0040405,CT\nC004,short\n")
    with pytest.raises(ConceptFileError, match=r"cui_mapping.csv:3: expected CUI,NAME with a CUI of C and 7 digits, got 'C004,short'"):
        read_cui_names(path)
