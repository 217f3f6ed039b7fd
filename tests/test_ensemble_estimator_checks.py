"""The ensemble's estimators against scikit-learn's estimator checks, as LightGBM's test_sklearn.py does.

What runs, and why the rest cannot:

* `ConceptThresholdTuner` and `ExpectedF1Decoder` take X = probabilities of shape
  (n_images, n_concepts), dense or sparse, and y = a label matrix OF THE SAME SHAPE (multi-label).
  Their tags say so (sparse input, NaN = "no score", y required and 2-D). They go through
  `parametrize_with_checks`; the checks that need no data, or whose data fit this contract
  (1-D X refused, complex X refused, y=None refused, a one-column X with a one-column y,
  NotFittedError before fit), run and must pass. Every other check fits on data scikit-learn
  generates with a y of another shape than X (a 1-D or one-column y beside a multi-column X);
  fit refuses that mismatch (a probability matrix and a label matrix must align concept by
  concept), so those checks are
  expected failures with `xfail_strict=True`: one that starts passing fails the suite, and the
  list has to be revisited. The property each of them checks is tested below by hand on
  multi-label sparse data (see `BY_HAND`).
* `ExpectedF1Decoder` works unfitted (with m = 0: decoding needs no learned state), so its tag
  `requires_fit` is False and the "NotFittedError before fit" checks do not run for it; the
  unfitted rule is tested below instead.
* `n_features_in_` (check_n_features_in, check_n_features_in_after_fitting) is not kept: the
  tuner checks the concept count against `thresholds_.size` (tested below), the decoder works
  row by row on any number of concepts.
* `ConceptStacker`'s X is a `StackingInputs` (several aligned matrices), not an array: its tag
  `two_d_array=False` makes `check_estimator` skip every data check, so the data-free API checks
  are called one by one, and fit-returns-self, parameters untouched, learned state ending in `_`,
  NotFittedError, clone, deterministic refit and row-wise prediction are tested by hand.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

# Tags (1.6) and parametrize_with_checks(xfail_strict=...) (1.8); the package itself runs on older releases.
pytest.importorskip("sklearn", minversion="1.8")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.utils import get_tags  # noqa: E402
from sklearn.utils import estimator_checks as checks  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402

from conceptclef.ensemble.decoding import ExpectedF1Decoder  # noqa: E402
from conceptclef.ensemble.stacker import ConceptStacker  # noqa: E402
from conceptclef.ensemble.thresholds import ConceptThresholdTuner  # noqa: E402
from synthetic_stacking import make_synthetic_set  # noqa: E402

RULES = [
    ConceptThresholdTuner(prior_strength=2.0, min_labels=1, max_labels=6),
    ExpectedF1Decoder(min_labels=1, max_labels=6),
]

# sklearn check -> the test below that checks the same property on multi-label data.
BY_HAND = {
    "check_fit_score_takes_y": "test_fit_returns_self_and_learns_only_underscored_attributes",
    "check_estimators_fit_returns_self": "test_fit_returns_self_and_learns_only_underscored_attributes",
    "check_dont_overwrite_parameters": "test_fit_returns_self_and_learns_only_underscored_attributes",
    "check_estimators_overwrite_params": "test_fit_returns_self_and_learns_only_underscored_attributes",
    "check_fit_check_is_fitted": "test_fit_returns_self_and_learns_only_underscored_attributes",
    "check_dict_unchanged": "test_predict_leaves_the_estimator_unchanged",
    "check_fit_idempotent": "test_refit_is_idempotent",
    "check_pipeline_consistency": "test_refit_is_idempotent",
    "check_methods_subset_invariance": "test_prediction_is_row_wise",
    "check_methods_sample_order_invariance": "test_prediction_is_row_wise",
    "check_estimator_sparse_tag": "test_dense_sparse_and_dtype_variants_fit_and_predict_the_same",
    "check_estimator_sparse_array": "test_dense_sparse_and_dtype_variants_fit_and_predict_the_same",
    "check_estimator_sparse_matrix": "test_dense_sparse_and_dtype_variants_fit_and_predict_the_same",
    "check_estimators_dtypes": "test_dense_sparse_and_dtype_variants_fit_and_predict_the_same",
    "check_f_contiguous_array_estimator": "test_dense_sparse_and_dtype_variants_fit_and_predict_the_same",
    "check_dtype_object": "test_dense_sparse_and_dtype_variants_fit_and_predict_the_same",
    "check_readonly_memmap_input": "test_read_only_memory_mapped_inputs",
    "check_estimators_pickle": "test_pickle_round_trip_predicts_the_same",
    "check_fit2d_predict1d": "test_misaligned_or_one_dimensional_inputs_are_refused",
    "check_fit2d_1sample": "test_one_image_and_empty_inputs",
    "check_estimators_empty_data_messages": "test_one_image_and_empty_inputs",
    "check_positive_only_tag_during_fit": "test_negative_scores_are_accepted_as_the_positive_only_tag_says",
    "check_n_features_in": "test_tuner_refuses_another_concept_count",
    "check_n_features_in_after_fitting": "test_tuner_refuses_another_concept_count",
}


def expected_failed_checks(estimator) -> dict[str, str]:
    reason = "y of another shape than X, refused by fit; tested by hand in {test}"
    return {name: reason.format(test=test) for name, test in BY_HAND.items()}


def check_name(check) -> str:
    while hasattr(check, "func"):  # checks come wrapped in functools.partial
        check = check.func
    return check.__name__


@parametrize_with_checks(RULES, expected_failed_checks=expected_failed_checks, xfail_strict=True)
def test_decision_rules_pass_the_sklearn_checks_that_apply(estimator, check):
    if check_name(check) not in BY_HAND:
        check(estimator)
        return
    try:
        check(estimator)
    except Exception as error:
        # Expected to fail (strict xfail): a one-line error spares pytest formatting 50 long
        # tracebacks through scikit-learn's checks, which took most of this module's time.
        raise AssertionError(f"{type(error).__name__}: {error}") from None


# -- the same properties on multi-label sparse data --


def multilabel_data(seed: int = 0, n_images: int = 60, n_concepts: int = 8):
    """(dense probabilities with unscored zeros, bool truth, out-of-vocabulary counts)."""
    rng = np.random.default_rng(seed)
    truth = rng.random((n_images, n_concepts)) < 0.3
    probs = np.clip(truth * 0.4 + rng.random((n_images, n_concepts)) * 0.6, 0, 1).astype(np.float32)
    probs[probs < 0.15] = 0.0  # not a candidate: absent from the sparse form
    outside = rng.integers(0, 2, n_images)
    return probs, truth, outside


def learned_state(estimator) -> dict:
    return {key: value for key, value in vars(estimator).items() if key.endswith("_")}


def assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)


def same_labels(first: sp.spmatrix, second: sp.spmatrix) -> bool:
    return first.shape == second.shape and (first != second).nnz == 0


rules = pytest.mark.parametrize("rule", RULES, ids=lambda rule: type(rule).__name__)


@rules
def test_fit_returns_self_and_learns_only_underscored_attributes(rule):
    probs, truth, outside = multilabel_data()
    estimator = clone(rule)
    params = copy.deepcopy(estimator.get_params())
    before = set(vars(estimator))
    assert before == set(params)  # __init__ stores the parameters and nothing else
    if get_tags(estimator).requires_fit:
        with pytest.raises(NotFittedError):
            check_is_fitted(estimator)
    assert estimator.fit(sp.csr_matrix(probs), sp.csr_matrix(truth), outside) is estimator
    assert estimator.get_params() == params  # fit does not touch the parameters
    added = set(vars(estimator)) - before
    assert added and all(name.endswith("_") and not name.startswith("_") for name in added), added
    check_is_fitted(estimator)


@rules
def test_predict_leaves_the_estimator_unchanged(rule):
    probs, truth, outside = multilabel_data()
    estimator = clone(rule).fit(probs, truth, outside)
    state = copy.deepcopy(vars(estimator))
    estimator.predict(sp.csr_matrix(probs))
    assert vars(estimator).keys() == state.keys()
    assert_same_state(vars(estimator), state)


@rules
def test_refit_is_idempotent(rule):
    probs, truth, outside = multilabel_data(seed=1)
    other_probs, other_truth, other_outside = multilabel_data(seed=2)
    estimator = clone(rule).fit(probs, truth, outside)
    state, labels = copy.deepcopy(learned_state(estimator)), estimator.predict(other_probs)
    estimator.fit(other_probs, other_truth, other_outside)  # fitted on something else in between
    estimator.fit(probs, truth, outside)
    assert_same_state(learned_state(estimator), state)
    assert same_labels(estimator.predict(other_probs), labels)


@rules
def test_prediction_is_row_wise(rule):
    """A fitted rule decides each image alone: subsets and reorderings of images change nothing else."""
    probs, truth, outside = multilabel_data()
    estimator = clone(rule).fit(probs, truth, outside)
    full = estimator.predict(probs).toarray()
    assert full.any() and not full.all()
    subset = np.arange(0, probs.shape[0], 3)
    np.testing.assert_array_equal(estimator.predict(probs[subset]).toarray(), full[subset])
    order = np.random.default_rng(3).permutation(probs.shape[0])
    np.testing.assert_array_equal(estimator.predict(probs[order]).toarray(), full[order])


@rules
def test_dense_sparse_and_dtype_variants_fit_and_predict_the_same(rule):
    probs, truth, outside = multilabel_data()
    reference = clone(rule).fit(probs, truth, outside)
    expected = reference.predict(probs)
    variants = {
        "csr_matrix": (sp.csr_matrix(probs), sp.csr_matrix(truth)),
        "csr_array": (sp.csr_array(probs), sp.csr_array(truth)),
        "csc_matrix": (sp.csc_matrix(probs), sp.csc_matrix(truth)),
        "coo_array": (sp.coo_array(probs), sp.coo_array(truth)),
        "float64 Fortran-ordered, 0/1 int labels": (np.asfortranarray(probs, dtype=np.float64), truth.astype(np.int64)),
        "object dtype": (probs.astype(object), truth.astype(object)),
    }
    for name, (x, y) in variants.items():
        fitted = clone(rule).fit(x, y, outside)
        assert_same_state(learned_state(fitted), learned_state(reference))
        assert same_labels(fitted.predict(x), expected), name
    assert expected.dtype == bool and expected.format == "csr" and expected.shape == probs.shape


@rules
def test_read_only_memory_mapped_inputs(rule, tmp_path):
    probs, truth, outside = multilabel_data()
    for name, array in {"probs": probs, "truth": truth, "outside": outside}.items():
        np.save(tmp_path / f"{name}.npy", array)
    mapped = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("probs", "truth", "outside")}
    fitted = clone(rule).fit(mapped["probs"], mapped["truth"], mapped["outside"])
    assert_same_state(learned_state(fitted), learned_state(clone(rule).fit(probs, truth, outside)))
    assert same_labels(fitted.predict(mapped["probs"]), fitted.predict(probs))
    np.testing.assert_array_equal(np.load(tmp_path / "probs.npy"), probs)  # inputs are never written


@rules
def test_pickle_round_trip_predicts_the_same(rule):
    probs, truth, outside = multilabel_data()
    fitted = clone(rule).fit(probs, truth, outside)
    restored = pickle.loads(pickle.dumps(fitted))
    assert restored.get_params() == fitted.get_params()
    assert_same_state(learned_state(restored), learned_state(fitted))
    assert same_labels(restored.predict(probs), fitted.predict(probs))


@rules
def test_misaligned_or_one_dimensional_inputs_are_refused(rule):
    """Each of these used to fit silently (or fail with an IndexError) on the old code."""
    probs, truth, outside = multilabel_data()
    with pytest.raises(ValueError, match="differ in shape"):
        clone(rule).fit(probs, truth[:, :5])  # the decoder raised IndexError / broadcast before
    with pytest.raises(ValueError, match="one count per image"):
        clone(rule).fit(probs, truth, outside[:1])  # a length-1 array broadcast to every image
    with pytest.raises(ValueError, match="2-D"):
        clone(rule).fit(probs[0], truth[0])  # read as one image before
    with pytest.raises(ValueError, match="2-D"):
        clone(rule).fit(probs, truth, outside).predict(probs[0])
    with pytest.raises(ValueError, match="requires y"):
        clone(rule).fit(probs, None)


@rules
def test_one_image_and_empty_inputs(rule):
    probs, truth, outside = multilabel_data()
    one = clone(rule).fit(probs[:1], truth[:1], outside[:1])
    assert one.predict(probs[:1]).shape == (1, probs.shape[1])
    fitted = clone(rule).fit(probs, truth, outside)
    empty = np.zeros((0, probs.shape[1]), dtype=np.float32)
    assert fitted.predict(empty).shape == (0, probs.shape[1])  # predicting for no image is fine
    with pytest.raises(ValueError, match="0 images"):  # fitting on none used to give default thresholds
        clone(rule).fit(empty, empty > 0)


@rules
def test_nan_is_no_score_and_infinity_is_refused(rule):
    """NaN marks a concept a model cannot score (tag allow_nan): it is never predicted, like a 0."""
    probs, truth, outside = multilabel_data()
    with_nan = probs.copy()
    with_nan[probs == 0] = np.nan
    fitted = clone(rule).fit(with_nan, truth, outside)
    assert_same_state(learned_state(fitted), learned_state(clone(rule).fit(probs, truth, outside)))
    assert same_labels(fitted.predict(with_nan), fitted.predict(probs))
    with_inf = probs.copy()
    with_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        clone(rule).fit(with_inf, truth, outside)
    with pytest.raises(ValueError, match="infinite"):
        fitted.predict(sp.csr_matrix(with_inf))


@rules
def test_negative_scores_are_accepted_as_the_positive_only_tag_says(rule):
    probs, truth, outside = multilabel_data()
    assert get_tags(rule).input_tags.positive_only is False
    shifted = probs - 0.5
    fitted = clone(rule).fit(shifted, truth, outside)
    assert fitted.predict(shifted).shape == probs.shape


def test_tuner_refuses_another_concept_count():
    probs, truth, outside = multilabel_data()
    tuner = ConceptThresholdTuner().fit(probs, truth, outside)
    with pytest.raises(ValueError, match="8 concepts|thresholds 8"):
        tuner.predict(probs[:, :5])


def test_tuner_raises_not_fitted_and_the_decoder_decodes_unfitted(tmp_path):
    probs, truth, outside = multilabel_data()
    tuner = ConceptThresholdTuner()
    for method in (tuner.predict, tuner.decide):
        with pytest.raises(NotFittedError):
            method(probs)
    with pytest.raises(NotFittedError):
        tuner.save(tmp_path)
    decoder = ExpectedF1Decoder(max_labels=6)
    assert get_tags(decoder).requires_fit is False and get_tags(tuner).requires_fit is True
    unfitted = decoder.predict(probs)
    zero_missing = clone(decoder)
    zero_missing.expected_missing_ = 0.0
    assert same_labels(unfitted, zero_missing.predict(probs))
    fitted = clone(decoder).fit(probs, truth, outside + 3)  # many missing concepts: a different cut
    assert fitted.expected_missing_ > 0 and not same_labels(fitted.predict(probs), unfitted)
    assert not hasattr(clone(fitted), "expected_missing_")  # a clone is unfitted


# -- ConceptStacker: X is a StackingInputs --

STACKER = ConceptStacker(candidates_per_model=6, n_estimators=8, num_leaves=7, min_child_samples=5, seed=2, num_threads=1)

DATA_FREE_CHECKS = [
    checks.check_estimator_cloneable,
    checks.check_estimator_tags_renamed,
    checks.check_valid_tag_types,
    checks.check_estimator_repr,
    checks.check_no_attributes_set_in_init,
    checks.check_do_not_raise_errors_in_init_or_set_params,
    checks.check_mixin_order,
    checks.check_parameters_default_constructible,
    checks.check_get_params_invariance,
    checks.check_set_params,
]


@pytest.mark.parametrize("check", DATA_FREE_CHECKS, ids=lambda check: check.__name__)
def test_stacker_passes_the_sklearn_checks_that_need_no_array(check):
    check(type(STACKER).__name__, STACKER)


def test_check_estimator_knows_the_stacker_takes_no_array():
    assert get_tags(STACKER).input_tags.two_d_array is False
    with pytest.warns(checks.SkipTestWarning, match="Can't test estimator"):
        results = checks.check_estimator(STACKER, on_fail=None)
    assert [result["check_name"] for result in results] == ["check_estimator_cloneable"]
    assert results[0]["status"] == "passed"


@pytest.fixture(scope="module")
def small_set():
    return make_synthetic_set(90, 16, n_categories=3, labels_per_image=3, seed=4)


def test_stacker_fit_returns_self_and_learns_only_underscored_attributes(small_set):
    stacker = clone(STACKER)
    params = copy.deepcopy(stacker.get_params())
    assert set(vars(stacker)) == set(params)
    for method in (stacker.predict_proba,):
        with pytest.raises(NotFittedError):
            method(small_set.inputs)
    with pytest.raises(NotFittedError):
        check_is_fitted(stacker)
    assert stacker.fit(small_set.inputs, small_set.truth) is stacker
    assert stacker.get_params() == params
    added = set(vars(stacker)) - set(params)
    assert added == {"booster_", "feature_names_", "categories_", "n_train_pairs_", "n_train_positive_pairs_"}
    check_is_fitted(stacker)


def test_stacker_refuses_to_predict_or_save_unfitted_and_misaligned_truth(small_set, tmp_path):
    with pytest.raises(NotFittedError):
        clone(STACKER).save(tmp_path)
    with pytest.raises(ValueError, match=r"truth has shape \(90, 15\)"):
        clone(STACKER).fit(small_set.inputs, small_set.truth[:, :15])  # read wrong labels before
    with pytest.raises(ValueError, match="requires y"):
        clone(STACKER).fit(small_set.inputs, None)


def test_stacker_clone_is_unfitted_and_refit_is_deterministic(small_set):
    fitted = clone(STACKER).fit(small_set.inputs, small_set.truth)
    copy_ = clone(fitted)
    assert copy_.get_params() == fitted.get_params() and not hasattr(copy_, "booster_")
    copy_.fit(small_set.inputs, small_set.truth)
    assert copy_.booster_.model_to_string() == fitted.booster_.model_to_string()
    expected = fitted.predict_proba(small_set.inputs)
    assert expected.nnz > 0
    np.testing.assert_array_equal(copy_.predict_proba(small_set.inputs).toarray(), expected.toarray())
    state = {key: value for key, value in vars(fitted).items() if key != "booster_"}
    fitted.predict_proba(small_set.inputs)  # prediction changes nothing
    assert {key: value for key, value in vars(fitted).items() if key != "booster_"} == state


def test_stacker_prediction_is_row_wise(small_set):
    stacker = clone(STACKER).fit(small_set.inputs, small_set.truth)
    full = stacker.predict_proba(small_set.inputs).toarray()
    rows = np.random.default_rng(0).permutation(small_set.inputs.n_images)[:40]
    np.testing.assert_array_equal(stacker.predict_proba(small_set.inputs.subset(rows)).toarray(), full[rows])
