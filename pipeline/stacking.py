"""From the base models' saved predictions to a fitted stacker and decision rule, and back.

The stacker only ever learns from predictions on images the base models did not train on (the
validation split), cross-fitted so every validation image also gets an out-of-fold stacked
probability for tuning thresholds and for the ablation. It can be re-fitted alone from the
saved predictions (`train-all --only ensemble`) without touching the networks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.core.config import Config
from conceptclef.core.runfiles import atomic_save_arrays, atomic_write_json, load_arrays, read_json
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.decoding import choose_decision_rule, load_decision, save_decision
from conceptclef.ensemble.features import feature_names_for
from conceptclef.ensemble.inputs import StackingInputs, project_to_columns
from conceptclef.ensemble.knn import NearestNeighbourScorer
from conceptclef.ensemble.stacker import ConceptStacker, cross_fit_out_of_fold
from conceptclef.pipeline.base_models import PREDICTIONS_FILE, TRAIN_EMBEDDINGS_FILE, ModelPredictions
from conceptclef.pipeline.datasets import ImageSet
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.global_models import variant_dir, variant_names
from conceptclef.pipeline.run_directory import Manifest, RunLayout
from conceptclef.pipeline.validation_scores import out_of_fold_decisions, validation_scores
from conceptclef.scoring.secondary import outside_counts as secondary_outside_counts

log = logging.getLogger("conceptclef")

STATISTICS_FILE = "concept_statistics.npz"
KNN_INDEX_FILE = "knn_index.npz"
OOF_FILE = "oof_predictions.npz"
ENSEMBLE_FILE = "ensemble.json"
VALID_TRUTH_FILE = "valid_truth.npz"


@dataclass
class BaseOutputs:
    """Every base model's outputs on one image set, each over its own columns."""

    image_ids: list[str]
    router_probs: np.ndarray
    router_categories: list[str]
    global_probs: np.ndarray
    global_embeddings: np.ndarray
    category_probs: dict[str, np.ndarray]
    category_cuis: dict[str, list[str]]
    extra_global_probs: dict[str, np.ndarray] = field(default_factory=dict)  # extra global models, global columns


@dataclass
class ConceptStatistics:
    """Training frequencies of the global vocabulary's concepts, overall and per category."""

    concept_frequency: np.ndarray
    category_concept_frequency: np.ndarray

    @classmethod
    def from_training(cls, train: ImageSet, vocabulary: ConceptVocabulary, categories: list[str]) -> "ConceptStatistics":
        labels = train.labels(vocabulary).tocsr()
        names = np.array([str(category) for category in train.categories])
        overall = np.asarray(labels.sum(axis=0)).ravel() / max(labels.shape[0], 1)
        per_category = np.zeros((len(categories), len(vocabulary)), dtype=np.float32)
        for row, category in enumerate(categories):
            members = np.flatnonzero(names == category)
            if len(members):
                per_category[row] = np.asarray(labels[members].sum(axis=0)).ravel() / len(members)
        return cls(overall.astype(np.float32), per_category)

    def save(self, path: Path) -> None:
        atomic_save_arrays(path, concept_frequency=self.concept_frequency, category_concept_frequency=self.category_concept_frequency)

    @classmethod
    def load(cls, path: Path) -> "ConceptStatistics":
        arrays = load_arrays(path)
        return cls(arrays["concept_frequency"], arrays["category_concept_frequency"])


def save_knn_index(path: Path, embeddings: np.ndarray, labels: sp.csr_matrix) -> None:
    labels = sp.csr_matrix(labels, dtype=np.float32)
    atomic_save_arrays(
        path,
        embeddings=embeddings.astype(np.float32),
        indptr=labels.indptr,
        indices=labels.indices,
        shape=np.array(labels.shape),
    )


def load_knn_scorer(path: Path, n_neighbours: int) -> NearestNeighbourScorer:
    arrays = load_arrays(path)
    labels = sp.csr_matrix(
        (np.ones(len(arrays["indices"]), np.float32), arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"])
    )
    return NearestNeighbourScorer(n_neighbours=n_neighbours).fit(arrays["embeddings"], labels)


def load_validation_outputs(layout: RunLayout, manifest: Manifest, extra_global_models: list[str] | tuple[str, ...] = ()) -> BaseOutputs:
    """The base models' saved predictions on the validation images, aligned by image id."""
    router = ModelPredictions.load(layout.router_dir / PREDICTIONS_FILE)
    global_predictions = ModelPredictions.load(layout.global_dir / PREDICTIONS_FILE)
    image_ids = global_predictions.image_ids
    if router.image_ids != image_ids:
        raise RunDirectoryError(f"{layout.router_dir / PREDICTIONS_FILE}: validation images differ from the global model's")
    category_probs: dict[str, np.ndarray] = {}
    category_cuis: dict[str, list[str]] = {}
    for category in active_categories(manifest):
        predictions = ModelPredictions.load(layout.category_dir(category) / PREDICTIONS_FILE)
        if predictions.image_ids != image_ids:
            raise RunDirectoryError(f"{layout.category_dir(category) / PREDICTIONS_FILE}: validation images differ from the global model's")
        category_probs[category] = predictions.probs
        category_cuis[category] = list(ConceptVocabulary.load(layout.category_dir(category) / "vocabulary.json").cuis)
    extra_probs: dict[str, np.ndarray] = {}
    for name in extra_global_models:
        path = variant_dir(layout, name) / PREDICTIONS_FILE
        predictions = ModelPredictions.load(path)
        if predictions.image_ids != image_ids:
            raise RunDirectoryError(f"{path}: validation images differ from the global model's")
        extra_probs[name] = predictions.probs
    return BaseOutputs(
        image_ids=image_ids,
        router_probs=router.probs,
        router_categories=list(manifest.categories),
        global_probs=global_predictions.probs,
        global_embeddings=global_predictions.embeddings,
        category_probs=category_probs,
        category_cuis=category_cuis,
        extra_global_probs=extra_probs,
    )


def active_categories(manifest: Manifest) -> list[str]:
    """Categories with a model of their own (the others fall back to the global model)."""
    return [category for category in manifest.categories if category not in manifest.fallback_categories]


def to_stacking_inputs(
    outputs: BaseOutputs,
    vocabulary: ConceptVocabulary,
    statistics: ConceptStatistics,
    knn: NearestNeighbourScorer,
) -> StackingInputs:
    global_cuis = list(vocabulary.cuis)
    return StackingInputs(
        image_ids=outputs.image_ids,
        global_probs=outputs.global_probs,
        category_probs={
            category: project_to_columns(probs, outputs.category_cuis[category], global_cuis)
            for category, probs in outputs.category_probs.items()
        },
        router_probs=outputs.router_probs,
        categories=outputs.router_categories,
        knn_scores=knn.predict(outputs.global_embeddings),
        concept_frequency=statistics.concept_frequency,
        category_concept_frequency=statistics.category_concept_frequency,
        extra_global_probs=dict(outputs.extra_global_probs),
    )


def fit_ensemble_stage(
    layout: RunLayout,
    config: Config,
    manifest: Manifest,
    train: ImageSet,
    valid: ImageSet,
    vocabulary: ConceptVocabulary,
) -> None:
    """Fit the stacker (cross-fitted) and pick and tune the decision rule on validation."""
    ensemble_dir = layout.ensemble_dir
    statistics = ConceptStatistics.from_training(train, vocabulary, manifest.categories)
    statistics.save(ensemble_dir / STATISTICS_FILE)
    train_embeddings = ModelPredictions.load(layout.global_dir / TRAIN_EMBEDDINGS_FILE)
    if train_embeddings.image_ids != train.image_ids:
        raise RunDirectoryError(f"{layout.global_dir / TRAIN_EMBEDDINGS_FILE}: training images differ from the data's")
    save_knn_index(ensemble_dir / KNN_INDEX_FILE, train_embeddings.embeddings, train.labels(vocabulary))
    knn = load_knn_scorer(ensemble_dir / KNN_INDEX_FILE, config.ensemble.knn_neighbours)

    outputs = load_validation_outputs(layout, manifest, variant_names(config))
    by_id = {image_id: index for index, image_id in enumerate(valid.image_ids)}
    if [by_id.get(image_id) for image_id in outputs.image_ids] != list(range(len(valid.image_ids))):
        raise RunDirectoryError(f"{layout.global_dir / PREDICTIONS_FILE}: validation images differ from the data's")
    inputs = to_stacking_inputs(outputs, vocabulary, statistics, knn)
    truth = valid.labels(vocabulary)
    truth_outside = vocabulary.outside_counts(valid.concept_lists)
    secondary_outside = secondary_outside_counts(valid.concept_lists, vocabulary.cuis)
    save_validation_truth(
        ensemble_dir / VALID_TRUTH_FILE, valid.image_ids, truth, truth_outside, [str(c) for c in valid.categories], secondary_outside
    )

    log.info("ensemble: cross-fitting the stacker over %d folds", config.ensemble.folds)
    cross_fit = cross_fit_out_of_fold(inputs, truth, config.ensemble, seed=config.seed)
    log.info("ensemble: %d boosting rounds (of at most %d)", cross_fit.rounds, config.ensemble.n_estimators)
    rule, decider, scores = choose_decision_rule(cross_fit.oof_probs, truth, truth_outside, config.ensemble, seed=config.seed)
    log.info("ensemble: decision rule %s (cross-validated F1 %s)", rule, {name: round(value, 4) for name, value in scores.items()})
    oof_decisions = out_of_fold_decisions(rule, cross_fit.oof_probs, truth, truth_outside, config.ensemble, config.seed)
    valid_scores = validation_scores(
        oof_decisions, cross_fit.oof_probs, truth, truth_outside, list(vocabulary.cuis), secondary_outside, statistics.concept_frequency
    )
    log.info(
        "ensemble: validation F1 %.4f over %d images, secondary F1 %.4f over %d images (out-of-fold, %s rule)",
        valid_scores.primary, valid_scores.n_images, valid_scores.secondary, valid_scores.n_secondary_images, rule,
    )
    cross_fit.stacker.save(ensemble_dir)
    save_decision(ensemble_dir, rule, decider, scores)
    oof = sp.csr_matrix(cross_fit.oof_probs, dtype=np.float32)
    atomic_save_arrays(
        ensemble_dir / OOF_FILE,
        image_ids=np.array(outputs.image_ids),
        data=oof.data,
        indices=oof.indices,
        indptr=oof.indptr,
        shape=np.array(oof.shape),
    )
    atomic_write_json(
        ensemble_dir / ENSEMBLE_FILE,
        {
            "rule": rule,
            "cross_validated_f1": scores,
            "validation_scores": valid_scores.to_json(),
            "boosting_rounds": cross_fit.rounds,
            "vocabulary": vocabulary.fingerprint(),
            "categories": manifest.categories,
        },
    )


def save_validation_truth(
    path: Path,
    image_ids: list[str],
    truth: sp.csr_matrix,
    outside: np.ndarray,
    categories: list[str],
    secondary_outside: np.ndarray | None = None,
) -> None:
    """Keep the validation truth in the run, so the ablation needs no access to the data folder.

    `secondary_outside` counts each image's secondary-list CUIs outside the vocabulary (misses of
    the secondary score that the matrix cannot show).
    """
    truth = sp.csr_matrix(truth, dtype=np.float32)
    extra = {} if secondary_outside is None else {"secondary_outside": np.asarray(secondary_outside, dtype=np.int64)}
    atomic_save_arrays(
        path,
        **extra,
        image_ids=np.array(image_ids),
        indices=truth.indices,
        indptr=truth.indptr,
        shape=np.array(truth.shape),
        outside=np.asarray(outside, dtype=np.int64),
        categories=np.array(categories),
    )


def load_validation_truth(layout: RunLayout) -> tuple[list[str], sp.csr_matrix, np.ndarray, list[str]]:
    arrays = load_arrays(layout.ensemble_dir / VALID_TRUTH_FILE)
    truth = sp.csr_matrix(
        (np.ones(len(arrays["indices"]), np.float32), arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"])
    )
    return (
        [str(image_id) for image_id in arrays["image_ids"]],
        truth,
        arrays["outside"],
        [str(category) for category in arrays["categories"]],
    )


def load_oof_probabilities(layout: RunLayout) -> tuple[list[str], sp.csr_matrix]:
    arrays = load_arrays(layout.ensemble_dir / OOF_FILE)
    matrix = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))
    return [str(image_id) for image_id in arrays["image_ids"]], matrix


@dataclass
class FittedEnsemble:
    """What predict needs from RUN/ensemble: stacker, decision rule, statistics, kNN index."""

    stacker: ConceptStacker
    decider: object
    rule: str
    statistics: ConceptStatistics
    knn: NearestNeighbourScorer

    @classmethod
    def load(cls, layout: RunLayout, config: Config, manifest: Manifest, vocabulary: ConceptVocabulary) -> "FittedEnsemble":
        ensemble_dir = layout.ensemble_dir
        if "ensemble" not in manifest.finished_stages or not (ensemble_dir / ENSEMBLE_FILE).is_file():
            raise RunDirectoryError(f"{layout.root}: the ensemble stage has not finished; rerun train-all")
        record = read_json(ensemble_dir / ENSEMBLE_FILE)
        if record["vocabulary"] != vocabulary.fingerprint() or record["categories"] != manifest.categories:
            raise RunDirectoryError(
                f"{ensemble_dir / ENSEMBLE_FILE}: the ensemble was fitted for another vocabulary or category set; "
                "rerun `train-all --only ensemble`"
            )
        rule, decider = load_decision(ensemble_dir)
        stacker = ConceptStacker.load(ensemble_dir)
        if stacker.feature_names_ != feature_names_for(manifest.categories, variant_names(config)):
            raise RunDirectoryError(
                f"{ensemble_dir / 'stacker.json'}: the stacker was fitted by another version of conceptclef "
                "(different features); rerun `train-all --only ensemble` to re-fit it from the saved predictions"
            )
        return cls(
            stacker=stacker,
            decider=decider,
            rule=rule,
            statistics=ConceptStatistics.load(ensemble_dir / STATISTICS_FILE),
            knn=load_knn_scorer(ensemble_dir / KNN_INDEX_FILE, config.ensemble.knn_neighbours),
        )
