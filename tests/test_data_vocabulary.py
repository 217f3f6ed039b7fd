"""ConceptVocabulary: counting, sparse encoding, out-of-vocabulary counts, persistence, full scale."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.data.errors import DataError
from conceptclef.data.vocabulary import ConceptVocabulary

LISTS = [["C0000003", "C0000001"], ["c0000001", "C0000001"], ["C0000002", "C0000001"], []]


def test_from_concept_lists_counts_each_image_once_and_applies_min_count() -> None:
    assert ConceptVocabulary.from_concept_lists(LISTS).cuis == ("C0000001", "C0000002", "C0000003")
    # C0000001 appears on three images; the repeat inside image 2 must not count twice.
    assert ConceptVocabulary.from_concept_lists(LISTS, min_count=2).cuis == ("C0000001",)
    assert ConceptVocabulary.from_concept_lists(LISTS, min_count=4).cuis == ()


def test_encode_outside_counts_decode_index_of() -> None:
    vocabulary = ConceptVocabulary(["C0000002", "C0000001"])
    matrix = vocabulary.encode(LISTS)
    assert sp.isspmatrix_csr(matrix) and matrix.dtype == np.float32 and matrix.shape == (4, 2)
    assert matrix.toarray().tolist() == [[1, 0], [1, 0], [1, 1], [0, 0]]
    assert vocabulary.outside_counts(LISTS).tolist() == [1, 0, 0, 0]
    assert vocabulary.decode([1, 0]) == ["C0000002", "C0000001"]
    assert vocabulary.index_of("c0000002") == 1 and "C0000002" in vocabulary and "C0000003" not in vocabulary
    with pytest.raises(KeyError):
        vocabulary.index_of("C0000003")


def test_malformed_cui_is_refused() -> None:
    with pytest.raises(ValueError, match="C123"):
        ConceptVocabulary(["C0000001", "C123"])


def test_save_load_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    vocabulary = ConceptVocabulary.from_concept_lists(LISTS)
    vocabulary.save(tmp_path / "vocabulary.json")
    loaded = ConceptVocabulary.load(tmp_path / "vocabulary.json")
    assert loaded == vocabulary and loaded.fingerprint() == vocabulary.fingerprint() and len(loaded) == 3
    assert ConceptVocabulary(["C0000001"]).fingerprint() != vocabulary.fingerprint()
    text = (tmp_path / "vocabulary.json").read_text().replace("C0000003", "C0000004")
    (tmp_path / "edited.json").write_text(text)
    with pytest.raises(DataError, match="fingerprint"):
        ConceptVocabulary.load(tmp_path / "edited.json")


def test_full_2020_scale_stays_sparse_and_fast() -> None:
    """80,723 images x 3,047 CUIs: a dense float32 matrix would be ~1 GB."""
    rng = np.random.default_rng(0)
    cuis = [f"C{number:07d}" for number in range(3_047)]
    counts = rng.integers(1, 12, 80_723)
    columns = rng.integers(0, 3_047 + 200, counts.sum())  # ~6% of draws fall outside the vocabulary
    all_cuis = cuis + [f"C{number:07d}" for number in range(5_000_000, 5_000_200)]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    lists = [[all_cuis[c] for c in columns[offsets[i] : offsets[i + 1]]] for i in range(len(counts))]
    vocabulary = ConceptVocabulary(cuis)
    start = time.perf_counter()
    matrix = vocabulary.encode(lists)
    outside = vocabulary.outside_counts(lists)
    elapsed = time.perf_counter() - start
    assert sp.issparse(matrix) and matrix.shape == (80_723, 3_047)
    assert matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes < 10_000_000
    assert int(matrix.sum()) + int(outside.sum()) == sum(len(set(items)) for items in lists)
    assert elapsed < 10.0
