"""Extra global models as stacker inputs: their candidates, their feature columns, and a stacker
that learns to use the one that carries the signal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.candidates import build_candidates
from conceptclef.ensemble.features import build_pair_table, feature_names_for
from conceptclef.ensemble.stacker import ConceptStacker
from synthetic_stacking import make_synthetic_set


def _view_of_truth(truth, strength: float, seed: int) -> np.ndarray:
    """Another backbone's probabilities: the truth seen through its own noise."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(truth.shape).astype(np.float32) - 2.5 + strength * truth.toarray()
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_set(240, 50, n_categories=3, labels_per_image=4, seed=5)


def test_extra_global_models_add_candidates_and_their_own_columns(synthetic):
    base = synthetic.inputs
    extra = _view_of_truth(synthetic.truth, 3.0, seed=1)
    inputs = dataclasses.replace(base, extra_global_probs={"b": extra})
    k = 4
    candidates = build_candidates(inputs, k)
    # Each image's top-k of the extra model is among its candidates, with its rank.
    pairs = set(zip(candidates.rows.tolist(), candidates.cols.tolist()))
    for image in range(inputs.n_images):
        for concept in np.argsort(-extra[image])[:k]:
            assert (image, int(concept)) in pairs
    assert candidates.n_sources.max() <= 4

    table = build_pair_table(inputs, k)
    plain = build_pair_table(base, k)
    assert table.feature_names == feature_names_for(base.categories, ["b"])
    assert table.feature_names[: len(plain.feature_names)] == plain.feature_names  # no extras: the old columns, unchanged
    assert table.feature_names[len(plain.feature_names):] == ["global_prob:b", "rank:global:b", "global_models_mean"]
    column = {name: table.features[:, index] for index, name in enumerate(table.feature_names)}
    rows, cols = table.candidates.rows, table.candidates.cols
    np.testing.assert_allclose(column["global_prob:b"], extra[rows, cols])
    np.testing.assert_allclose(
        column["global_models_mean"], 0.5 * (np.asarray(base.global_probs, np.float32)[rows, cols] + extra[rows, cols]), rtol=1e-6
    )
    assert np.all(column["rank:global:b"] <= k)
    subset = inputs.subset(np.arange(10))
    np.testing.assert_array_equal(subset.extra_global_probs["b"], extra[:10])
    with pytest.raises(ValueError, match="extra_global_probs"):
        dataclasses.replace(base, extra_global_probs={"b": extra[:, :3]})


def test_the_stacker_learns_which_global_model_to_trust(synthetic):
    """With a second backbone that sees the concepts far better, the stacked probabilities rank
    held-out images' concepts better than without it: the stacker found and used that column."""
    base, truth = synthetic.inputs, synthetic.truth
    inputs = dataclasses.replace(base, extra_global_probs={"sharp": _view_of_truth(truth, 4.0, seed=2)})
    config = EnsembleConfig(n_estimators=60, num_leaves=7, min_child_samples=10, learning_rate=0.1)
    fit_rows, held_rows = np.arange(160), np.arange(160, 240)

    def held_out_precision(stack_inputs) -> float:
        stacker = ConceptStacker.from_config(config, seed=0, num_threads=1).fit(stack_inputs.subset(fit_rows), truth[fit_rows])
        probs = stacker.predict_proba(stack_inputs.subset(held_rows)).toarray()
        return average_precision_score(truth[held_rows].toarray().ravel(), probs.ravel())

    without, with_extra = held_out_precision(base), held_out_precision(inputs)
    assert with_extra > without + 0.05, (without, with_extra)
