"""The set of CUIs a model predicts, and the mapping between concept lists and label matrices.

Label matrices are sparse: the 2020 training set alone is 80,723 images x 3,047 CUIs with about
five concepts per image, so a dense float matrix would waste ~1 GB to store 0.2% ones. CUIs that
fall outside a vocabulary are counted rather than dropped silently, because the official score
still counts them as misses (see scoring.f1.per_image_f1_sparse).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.data.concepts import CUI_PATTERN
from conceptclef.data.errors import DataError

_FORMAT = "conceptclef-vocabulary"


class ConceptVocabulary:
    """Sorted, unique CUIs; column j of every label or probability matrix is `cuis[j]`."""

    def __init__(self, cuis: Iterable[str]) -> None:
        normalised = sorted({cui.strip().upper() for cui in cuis})
        bad = [cui for cui in normalised if not CUI_PATTERN.match(cui)]
        if bad:
            raise ValueError(f"malformed CUIs in vocabulary: {', '.join(bad[:5])}")
        self.cuis: tuple[str, ...] = tuple(normalised)
        self._index = {cui: index for index, cui in enumerate(self.cuis)}

    @classmethod
    def from_concept_lists(cls, lists: Iterable[Iterable[str]], min_count: int = 1) -> "ConceptVocabulary":
        """CUIs found on at least `min_count` images (a CUI repeated on one image counts once)."""
        counts: Counter[str] = Counter()
        for concepts in lists:
            counts.update({cui.strip().upper() for cui in concepts if cui.strip()})
        return cls(cui for cui, count in counts.items() if count >= min_count)

    def __len__(self) -> int:
        return len(self.cuis)

    def __contains__(self, cui: object) -> bool:
        return isinstance(cui, str) and cui.strip().upper() in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConceptVocabulary) and self.cuis == other.cuis

    def __repr__(self) -> str:
        return f"ConceptVocabulary({len(self)} CUIs, fingerprint={self.fingerprint()})"

    def index_of(self, cui: str) -> int:
        """Column of a CUI; KeyError when it is not in the vocabulary."""
        return self._index[cui.strip().upper()]

    def decode(self, indices: Iterable[int]) -> list[str]:
        """CUIs of the given column indices, in the given order."""
        return [self.cuis[int(index)] for index in indices]

    def encode(self, lists: Sequence[Iterable[str]]) -> sp.csr_matrix:
        """0/1 label matrix (n_images, len(self)) float32; CUIs outside the vocabulary are ignored."""
        indptr = [0]
        indices: list[int] = []
        for concepts in lists:
            columns = {column for cui in concepts if (column := self._index.get(cui.strip().upper())) is not None}
            indices.extend(sorted(columns))
            indptr.append(len(indices))
        data = np.ones(len(indices), dtype=np.float32)
        column_array = np.asarray(indices, dtype=np.int32)
        return sp.csr_matrix((data, column_array, np.asarray(indptr, dtype=np.int64)), shape=(len(indptr) - 1, len(self)))

    def outside_counts(self, lists: Sequence[Iterable[str]]) -> np.ndarray:
        """Per image, how many distinct CUIs are not in the vocabulary (they still count as misses)."""
        counts = np.zeros(len(lists), dtype=np.int32)
        for row, concepts in enumerate(lists):
            unique = {cui.strip().upper() for cui in concepts if cui.strip()}
            counts[row] = sum(1 for cui in unique if cui not in self._index)
        return counts

    def fingerprint(self) -> str:
        """Short hash of the CUI list, recorded in run manifests to catch mismatched models."""
        return hashlib.sha256("\n".join(self.cuis).encode("ascii")).hexdigest()[:16]

    def save(self, path: Path | str) -> None:
        atomic_write_json(path, {"format": _FORMAT, "fingerprint": self.fingerprint(), "cuis": list(self.cuis)})

    @classmethod
    def load(cls, path: Path | str) -> "ConceptVocabulary":
        """Read a saved vocabulary, checking it is one and that it was not edited by hand."""
        payload = read_json(path)
        valid = isinstance(payload, dict) and payload.get("format") == _FORMAT and isinstance(payload.get("cuis"), list)
        if not valid:
            raise DataError(path, "not a concept vocabulary file")
        vocabulary = cls(payload["cuis"])
        if payload.get("fingerprint") != vocabulary.fingerprint():
            raise DataError(path, "vocabulary fingerprint does not match its CUIs (file edited or damaged)")
        return vocabulary
