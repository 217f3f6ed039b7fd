"""Every public class and function of ensemble/ documents each of its parameters (numpydoc), and
every function its return value: the shapes and dtypes are what a caller cannot guess."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Protocol

import pytest

import conceptclef.ensemble as ensemble

# scikit-learn's vendored copy of numpydoc's parser: no extra dependency for one test.
docscrape = pytest.importorskip("sklearn.externals._numpydoc.docscrape")


def public_objects():
    for module_info in pkgutil.iter_modules(ensemble.__path__):
        module = importlib.import_module(f"{ensemble.__name__}.{module_info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) and Protocol in getattr(obj, "__mro__", ()):
                continue  # a Protocol's signature is typing's, not its own
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield pytest.param(obj, id=f"{module_info.name}.{name}")


def documented_names(doc) -> set[str]:
    return {part.strip() for entry in doc["Parameters"] for part in entry.name.split(",")}


@pytest.mark.parametrize("obj", list(public_objects()))
def test_public_ensemble_api_has_numpydoc_parameters_and_returns(obj):
    is_class = inspect.isclass(obj)
    doc = docscrape.ClassDoc(obj, config={"show_class_members": False}) if is_class else docscrape.FunctionDoc(obj)
    parameters = [name for name in inspect.signature(obj).parameters if name not in ("self", "cls")]
    missing = [name for name in parameters if name not in documented_names(doc)]
    assert not missing, f"{obj.__qualname__}: parameters without a numpydoc entry: {missing}"
    if not is_class:
        assert doc["Returns"], f"{obj.__qualname__}: no Returns section"
    for entry in doc["Parameters"]:
        assert entry.type, f"{obj.__qualname__}: parameter {entry.name} has no type"


def test_the_estimators_document_their_learned_attributes():
    from conceptclef.ensemble.decoding import ExpectedF1Decoder
    from conceptclef.ensemble.stacker import ConceptStacker
    from conceptclef.ensemble.thresholds import ConceptThresholdTuner

    expected = {
        ConceptStacker: {"booster_", "feature_names_", "categories_", "n_train_pairs_", "n_train_positive_pairs_", "eval_loss_", "eval_probs_"},
        ConceptThresholdTuner: {"global_threshold_", "thresholds_", "n_positives_", "sweep_scores_"},
        ExpectedF1Decoder: {"expected_missing_"},
    }
    for estimator, attributes in expected.items():
        doc = docscrape.ClassDoc(estimator, config={"show_class_members": False})
        assert {entry.name for entry in doc["Attributes"]} == attributes, estimator.__name__
