"""The final ensemble's primary and secondary scores on validation, as train-all logs them.

The decision rule is tuned on the validation images, so scoring it there needs out-of-fold
decisions: each fold's images are decided by the rule fitted on the other folds, from the
stacker's out-of-fold probabilities. Both scores then come from the same decisions, and every
image gets at least one concept, exactly as `predict` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.model_selection import KFold

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.decoding import make_decider
from conceptclef.ensemble.nonempty import at_least_one_concept
from conceptclef.scoring.f1 import per_image_f1_sparse
from conceptclef.scoring.secondary import per_image_subset_f1_sparse


@dataclass(frozen=True)
class ValidationScores:
    primary: float
    secondary: float
    n_images: int  # images scored by the primary score (non-empty truth)
    n_secondary_images: int  # images whose truth holds a concept of the secondary list

    def to_json(self) -> dict:
        return {
            "primary_f1": self.primary,
            "secondary_f1": self.secondary,
            "n_images": self.n_images,
            "n_secondary_images": self.n_secondary_images,
        }


def out_of_fold_decisions(
    rule: str,
    probs: sp.csr_matrix,
    truth: sp.csr_matrix,
    truth_outside: np.ndarray,
    config: EnsembleConfig,
    seed: int,
) -> sp.csr_matrix:
    """Every image's label set from the rule fitted on the folds it is not in."""
    probs, truth = sp.csr_matrix(probs), sp.csr_matrix(truth)
    decided = sp.lil_matrix(probs.shape, dtype=bool)
    for rest, held in KFold(n_splits=config.folds, shuffle=True, random_state=seed).split(np.arange(probs.shape[0])):
        decider = make_decider(rule, config).fit(probs[rest], truth[rest], np.asarray(truth_outside)[rest])
        decided[held] = sp.csr_matrix(decider.predict(probs[held]), dtype=bool)
    return decided.tocsr()


def validation_scores(
    decisions: sp.spmatrix,
    probs: sp.spmatrix,
    truth: sp.csr_matrix,
    truth_outside: np.ndarray,
    cuis: list[str],
    secondary_outside: np.ndarray,
    fallback_scores: np.ndarray,
) -> ValidationScores:
    """Primary and secondary F1 of out-of-fold decisions (topped up to one concept per image)."""
    chosen = at_least_one_concept(decisions, probs, fallback_scores)
    primary = per_image_f1_sparse(chosen, truth, truth_outside)
    secondary = per_image_subset_f1_sparse(chosen, truth, cuis, truth_outside=secondary_outside)
    return ValidationScores(
        primary=float(np.nanmean(primary)) if np.isfinite(primary).any() else 0.0,
        secondary=float(np.nanmean(secondary)) if np.isfinite(secondary).any() else 0.0,
        n_images=int(np.isfinite(primary).sum()),
        n_secondary_images=int(np.isfinite(secondary).sum()),
    )
