"""From the base models' saved predictions to a fitted stacker and decision rule, and back.

The stacker only ever learns from predictions on images the base models did not train on (the
validation split), cross-fitted so every validation image also gets an out-of-fold stacked
probability for tuning thresholds and for the ablation. It can be re-fitted alone from the
saved predictions (`train-all --only ensemble`) without touching the networks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.core.config import Config
from conceptclef.core.runfiles import atomic_save_arrays, atomic_save_sparse, atomic_write_json, load_arrays, load_sparse, read_json
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.decoding import Decider, choose_decision_rule, load_decision, save_decision
from conceptclef.data.modalities import ModalityMapping
from conceptclef.ensemble.features import feature_names_for
from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.modality import modality_columns, modality_count_errors, modality_rule_gain, one_modality
from conceptclef.ensemble.nonempty import at_least_one_concept
from conceptclef.ensemble.knn import NearestNeighbourScorer
from conceptclef.ensemble.projection import ProjectedProbabilities
from conceptclef.ensemble.stacker import ConceptStacker, cross_fit_out_of_fold
from conceptclef.pipeline.stages.train_networks import ModelPredictions
from conceptclef.pipeline.image_sets import ImageSet
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.run.networks import EXTRA_GLOBAL_PREFIX, Network, Role, run_networks
from conceptclef.pipeline.run.directory import Manifest
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.stages.validation_scores import out_of_fold_decisions, validation_scores
from conceptclef.scoring.secondary import outside_counts as secondary_outside_counts

log = logging.getLogger("conceptclef")



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
    # kNN scores already computed (cross-fitted networks: each fold's global model queries its own
    # index, so the embeddings of several folds never meet one index); None: from global_embeddings
    knn_scores: sp.csr_matrix | None = None

    @classmethod
    def from_saved(
        cls,
        saved: dict[str, ModelPredictions],
        networks: Sequence[Network],
        router_categories: list[str],
        global_embeddings: np.ndarray,
        knn_scores: sp.csr_matrix | None = None,
    ) -> "BaseOutputs":
        """The outputs of `networks` (one per kind) from their saved predictions, keyed by network name."""
        categories = [network for network in networks if network.role is Role.CATEGORY]
        return cls(
            image_ids=saved["global"].image_ids,
            router_probs=saved["router"].probs,
            router_categories=router_categories,
            global_probs=saved["global"].probs,
            global_embeddings=global_embeddings,
            category_probs={network.name: saved[network.name].probs for network in categories},
            category_cuis={network.name: list(ConceptVocabulary.load(network.files.vocabulary).cuis) for network in categories},
            extra_global_probs={
                network.name.removeprefix(EXTRA_GLOBAL_PREFIX): saved[network.name].probs
                for network in networks
                if network.role is Role.EXTRA_GLOBAL
            },
            knn_scores=knn_scores,
        )


@dataclass
class ConceptStatistics:
    """Training frequencies of the global vocabulary's concepts, overall and per category."""

    concept_frequency: np.ndarray
    category_concept_frequency: np.ndarray
    modality_category: np.ndarray | None = None  # (V,) router category of each modality CUI, -1 otherwise (ensemble.modality_features)
    several_position: int = -1

    @classmethod
    def from_training(
        cls, train: ImageSet, vocabulary: ConceptVocabulary, categories: list[str], mapping: ModalityMapping | None = None
    ) -> "ConceptStatistics":
        labels = train.labels(vocabulary).tocsr()
        names = np.array([str(category) for category in train.categories])
        overall = np.asarray(labels.sum(axis=0)).ravel() / max(labels.shape[0], 1)
        per_category = np.zeros((len(categories), len(vocabulary)), dtype=np.float32)
        for row, category in enumerate(categories):
            members = np.flatnonzero(names == category)
            if len(members):
                per_category[row] = np.asarray(labels[members].sum(axis=0)).ravel() / len(members)
        if mapping is None:
            return cls(overall.astype(np.float32), per_category)
        modality = modality_columns(list(vocabulary.cuis), mapping.category_of_cui, categories)
        several = categories.index(mapping.several) if mapping.several in categories else -1
        return cls(overall.astype(np.float32), per_category, modality, several)

    def save(self, path: Path) -> None:
        modality = {} if self.modality_category is None else {
            "modality_category": self.modality_category, "several_position": np.array([self.several_position])
        }
        atomic_save_arrays(
            path, concept_frequency=self.concept_frequency, category_concept_frequency=self.category_concept_frequency, **modality
        )

    @classmethod
    def load(cls, path: Path) -> "ConceptStatistics":
        arrays = load_arrays(path)
        if "modality_category" not in arrays:
            return cls(arrays["concept_frequency"], arrays["category_concept_frequency"])
        return cls(
            arrays["concept_frequency"], arrays["category_concept_frequency"], arrays["modality_category"], int(arrays["several_position"][0])
        )


def save_knn_index(path: Path, embeddings: np.ndarray, labels: sp.csr_matrix) -> None:
    atomic_save_sparse(path, sp.csr_matrix(labels, dtype=np.float32), binary=True, embeddings=embeddings.astype(np.float32))


def load_knn_scorer(path: Path, n_neighbours: int) -> NearestNeighbourScorer:
    labels, arrays = load_sparse(path)
    return NearestNeighbourScorer(n_neighbours=n_neighbours).fit(arrays["embeddings"], labels)


def load_validation_outputs(layout: RunLayout, manifest: Manifest, config: Config) -> BaseOutputs:
    """The saved predictions on the validation images of every network in the run's table, aligned
    by image id (cross-fitted networks: every development image's out-of-fold predictions)."""
    if config.development.scheme == "cross_fit":
        from conceptclef.pipeline.stages.cross_fit import load_out_of_fold_outputs  # it builds on this module

        return load_out_of_fold_outputs(layout, manifest, config)
    networks = run_networks(layout, config, manifest.categories, manifest.fallback_categories)
    saved = {network.name: ModelPredictions.load(network.files.validation_predictions) for network in networks}
    image_ids = saved["global"].image_ids
    for network in networks:
        if saved[network.name].image_ids != image_ids:
            raise RunDirectoryError(f"{network.files.validation_predictions}: validation images differ from the global model's")
    global_embeddings = saved["global"].embeddings
    if global_embeddings is None:
        raise RunDirectoryError(f"{layout.files(layout.global_dir).validation_predictions}: holds no embeddings (the kNN queries)")
    return BaseOutputs.from_saved(saved, networks, list(manifest.categories), global_embeddings)


def to_stacking_inputs(
    outputs: BaseOutputs,
    vocabulary: ConceptVocabulary,
    statistics: ConceptStatistics,
    knn: NearestNeighbourScorer | None,
) -> StackingInputs:
    """`knn` scores the global embeddings unless `outputs` carries its kNN scores (then it may be None)."""
    global_cuis = list(vocabulary.cuis)
    if outputs.knn_scores is not None:
        knn_scores = outputs.knn_scores
    elif knn is not None:
        knn_scores = knn.predict(outputs.global_embeddings)
    else:
        raise ValueError("no kNN index for outputs without kNN scores")
    return StackingInputs(
        image_ids=outputs.image_ids,
        global_probs=outputs.global_probs,
        category_probs={  # read on the global columns as asked: no dense (n, V) copy per category
            category: ProjectedProbabilities(probs, outputs.category_cuis[category], global_cuis)
            for category, probs in outputs.category_probs.items()
        },
        router_probs=outputs.router_probs,
        categories=outputs.router_categories,
        knn_scores=knn_scores,
        concept_frequency=statistics.concept_frequency,
        category_concept_frequency=statistics.category_concept_frequency,
        extra_global_probs=dict(outputs.extra_global_probs),
        modality_category=statistics.modality_category,
        several_position=statistics.several_position,
    )


def fit_ensemble(
    layout: RunLayout,
    config: Config,
    manifest: Manifest,
    train: ImageSet,
    valid: ImageSet,
    vocabulary: ConceptVocabulary,
) -> None:
    """Fit the stacker (cross-fitted) and pick and tune the decision rule on validation."""
    mapping = ModalityMapping.from_config(config.categories) if config.ensemble.modality_features else None
    statistics = ConceptStatistics.from_training(train, vocabulary, manifest.categories, mapping)
    statistics.save(layout.concept_statistics_path)
    embeddings_path = layout.files(layout.global_dir).train_embeddings
    train_embeddings = ModelPredictions.load(embeddings_path)
    if train_embeddings.image_ids != train.image_ids or train_embeddings.embeddings is None:
        raise RunDirectoryError(f"{embeddings_path}: training images differ from the data's")
    save_knn_index(layout.knn_index_path, train_embeddings.embeddings, train.labels(vocabulary))
    knn = load_knn_scorer(layout.knn_index_path, config.ensemble.knn_neighbours)

    outputs = load_validation_outputs(layout, manifest, config)
    by_id = {image_id: index for index, image_id in enumerate(valid.image_ids)}
    if [by_id.get(image_id) for image_id in outputs.image_ids] != list(range(len(valid.image_ids))):
        raise RunDirectoryError(f"{layout.files(layout.global_dir).validation_predictions}: validation images differ from the data's")
    fit_stacker_and_rule(layout, config, manifest, outputs, to_stacking_inputs(outputs, vocabulary, statistics, knn), valid, vocabulary, statistics)


def fit_stacker_and_rule(
    layout: RunLayout,
    config: Config,
    manifest: Manifest,
    outputs: BaseOutputs,
    inputs: StackingInputs,
    valid: ImageSet,
    vocabulary: ConceptVocabulary,
    statistics: ConceptStatistics,
) -> None:
    """The stacker (cross-fitted) and the decision rule from the base models' outputs on `valid`
    (images they never trained on), saved in RUN/ensemble with the truth they were fitted on."""
    ensemble_dir = layout.ensemble_dir
    truth = valid.labels(vocabulary)
    truth_outside = vocabulary.outside_counts(valid.known_concepts)
    secondary_outside = secondary_outside_counts(valid.known_concepts, vocabulary.cuis)
    save_validation_truth(
        layout.validation_truth_path, valid.image_ids, truth, truth_outside, [str(c) for c in valid.categories], secondary_outside
    )

    log.info("ensemble: cross-fitting the stacker over %d folds", config.ensemble.folds)
    cross_fit = cross_fit_out_of_fold(inputs, truth, config.ensemble, seed=config.seed)
    log.info("ensemble: %d boosting rounds (of at most %d)", cross_fit.rounds, config.ensemble.n_estimators)
    rule, decider, scores = choose_decision_rule(cross_fit.oof_probs, truth, truth_outside, config.ensemble, seed=config.seed)
    log.info("ensemble: decision rule %s (cross-validated F1 %s)", rule, {name: round(value, 4) for name, value in scores.items()})
    oof_decisions = out_of_fold_decisions(rule, cross_fit.oof_probs, truth, truth_outside, config.ensemble, config.seed)
    columns = ModalityColumns.of(config, vocabulary, manifest.categories)
    oof_probs = sp.csr_matrix(cross_fit.oof_probs)
    modality_applies, modality_report = choose_modality_rule(
        config, columns, sp.csr_matrix(oof_decisions, dtype=bool), oof_probs, outputs.router_probs, truth, truth_outside
    )
    log.info(
        "ensemble: of %d validation images naming one modality, the label sets name none for %d, several for %d, another for %d "
        "(out-of-fold); the one-modality rule changes F1 by %+.4f (standard error %.4f): %s",
        modality_report["errors_without"]["truth_one"], modality_report["errors_without"]["predicted_none"],
        modality_report["errors_without"]["predicted_several"], modality_report["errors_without"]["predicted_other"],
        modality_report["out_of_fold_gain"], modality_report["standard_error"], "applied" if modality_applies else "not applied",
    )
    if modality_applies:
        oof_decisions = one_modality(oof_decisions, oof_probs, outputs.router_probs, columns.category, columns.several_position)
    valid_scores = validation_scores(
        oof_decisions, cross_fit.oof_probs, truth, truth_outside, list(vocabulary.cuis), secondary_outside, statistics.concept_frequency
    )
    log.info(
        "ensemble: validation F1 %.4f over %d images, secondary F1 %.4f over %d images (out-of-fold, %s rule)",
        valid_scores.primary, valid_scores.n_images, valid_scores.secondary, valid_scores.n_secondary_images, rule,
    )
    cross_fit.stacker.save(ensemble_dir)
    save_decision(ensemble_dir, rule, decider, scores)
    atomic_save_sparse(layout.out_of_fold_path, sp.csr_matrix(cross_fit.oof_probs, dtype=np.float32), image_ids=np.array(outputs.image_ids))
    atomic_write_json(
        layout.ensemble_record_path,
        {
            "rule": rule,
            "cross_validated_f1": scores,
            "validation_scores": valid_scores.to_json(),
            "boosting_rounds": cross_fit.rounds,
            "vocabulary": vocabulary.fingerprint(),
            "categories": manifest.categories,
            "modality_rule": "on" if modality_applies else "off",
            "modality": modality_report,
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
    extra = {} if secondary_outside is None else {"secondary_outside": np.asarray(secondary_outside, dtype=np.int64)}
    atomic_save_sparse(
        path,
        sp.csr_matrix(truth, dtype=np.float32),
        binary=True,
        **extra,
        image_ids=np.array(image_ids),
        outside=np.asarray(outside, dtype=np.int64),
        categories=np.array(categories),
    )


@dataclass(frozen=True)
class ValidationTruth:
    """The validation truth a run keeps in RUN/ensemble (see `save_validation_truth`)."""

    image_ids: list[str]
    truth: sp.csr_matrix
    outside: np.ndarray
    categories: list[str]
    secondary_outside: np.ndarray | None  # None in runs made before the secondary score was saved


def load_validation_truth(layout: RunLayout) -> ValidationTruth:
    truth, arrays = load_sparse(layout.validation_truth_path)
    return ValidationTruth(
        [str(image_id) for image_id in arrays["image_ids"]],
        truth,
        arrays["outside"],
        [str(category) for category in arrays["categories"]],
        arrays.get("secondary_outside"),
    )


def load_oof_probabilities(layout: RunLayout) -> tuple[list[str], sp.csr_matrix]:
    matrix, arrays = load_sparse(layout.out_of_fold_path)
    return [str(image_id) for image_id in arrays["image_ids"]], matrix


@dataclass
class FittedEnsemble:
    """What predict needs from RUN/ensemble: stacker, decision rule, statistics, kNN index."""

    stacker: ConceptStacker
    decider: Decider
    rule: str
    statistics: ConceptStatistics
    knn: NearestNeighbourScorer | None  # None: cross-fitted networks (each fold has its own index)
    modality: ModalityColumns | None = None  # the one-modality rule's columns when validation chose it

    def decide(self, probs: sp.csr_matrix, router_probs: np.ndarray) -> sp.csr_matrix:
        """The run's label sets: the decision rule, one concept at least, then the one-modality rule if chosen."""
        decisions = at_least_one_concept(self.decider.predict(probs), probs, self.statistics.concept_frequency)
        if self.modality is None:
            return sp.csr_matrix(decisions, dtype=bool)
        return one_modality(decisions, probs, router_probs, self.modality.category, self.modality.several_position)

    @classmethod
    def load(cls, layout: RunLayout, config: Config, manifest: Manifest, vocabulary: ConceptVocabulary) -> "FittedEnsemble":
        ensemble_dir = layout.ensemble_dir
        if "ensemble" not in manifest.finished_stages or not layout.ensemble_record_path.is_file():
            raise RunDirectoryError(f"{layout.root}: the ensemble stage has not finished; rerun train-all")
        record = read_json(layout.ensemble_record_path)
        if record["vocabulary"] != vocabulary.fingerprint() or record["categories"] != manifest.categories:
            raise RunDirectoryError(
                f"{layout.ensemble_record_path}: the ensemble was fitted for another vocabulary or category set; "
                "rerun `train-all --only ensemble`"
            )
        rule, decider = load_decision(ensemble_dir)
        stacker = ConceptStacker.load(ensemble_dir)
        expected = feature_names_for(manifest.categories, [extra.name for extra in config.extra_global_models], config.ensemble.modality_features)
        if stacker.feature_names_ != expected:
            raise RunDirectoryError(
                f"{ensemble_dir / 'stacker.json'}: the stacker was fitted by another version of conceptclef "
                "(different features); rerun `train-all --only ensemble` to re-fit it from the saved predictions"
            )
        return cls(
            stacker=stacker,
            decider=decider,
            rule=rule,
            statistics=ConceptStatistics.load(layout.concept_statistics_path),
            knn=None if config.development.scheme == "cross_fit" else load_knn_scorer(layout.knn_index_path, config.ensemble.knn_neighbours),
            modality=ModalityColumns.of(config, vocabulary, manifest.categories) if record.get("modality_rule") == "on" else None,
        )


@dataclass(frozen=True)
class ModalityColumns:
    """Which vocabulary columns are modality CUIs of which router category, and the combined category's position."""

    category: np.ndarray  # (V,) int, -1: no modality CUI
    several_position: int

    @classmethod
    def of(cls, config: Config, vocabulary: ConceptVocabulary, categories: list[str]) -> "ModalityColumns":
        mapping = ModalityMapping.from_config(config.categories)
        several = categories.index(mapping.several) if mapping.several in categories else -1
        return cls(modality_columns(list(vocabulary.cuis), mapping.category_of_cui, categories), several)


def choose_modality_rule(
    config: Config, columns: ModalityColumns, decisions: sp.csr_matrix, probs: sp.csr_matrix, router_probs: np.ndarray,
    truth: sp.csr_matrix, truth_outside: np.ndarray,
) -> tuple[bool, dict]:
    """Whether the one-modality rule applies (config, or "auto": it raises the out-of-fold F1), and what validation says of it."""
    consistent = one_modality(decisions, probs, router_probs, columns.category, columns.several_position)
    gain, error = modality_rule_gain(decisions, consistent, truth, truth_outside)
    applies = config.ensemble.modality_rule == "on" or (config.ensemble.modality_rule == "auto" and gain > 0)
    return applies, {
        "setting": config.ensemble.modality_rule,
        "applied": applies,
        "out_of_fold_gain": gain,
        "standard_error": error,
        "errors_without": modality_count_errors(decisions, truth, columns.category),
        "errors_with": modality_count_errors(consistent, truth, columns.category),
    }
