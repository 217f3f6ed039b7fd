"""`ablation`: what each part of the system is worth, overall and per category.

Rows, all scored with the official sample-averaged F1 on the same images:
the k most frequent training concepts for every image (the trivial floor, k tuned on validation),
global model at 0.5 (the published baseline), global with tuned thresholds, per-category models
routed by the router, per-category with the true categories (oracle routing), the average of
global and routed category models, and the full stacked ensemble. Thresholds of the baseline
rows are tuned on validation like the ensemble's; on validation itself (no --images) every row
is cross-fitted so no row is scored on images it was tuned on. The rows built from a model's
dense probabilities see each image's `ABLATION_TOP_K` (100) most probable concepts, read block by
block: no rule labels more than 100 concepts per image, and the whole matrix as CSR (51 million
entries at 2026 size) made the tuners take minutes and gigabytes. Beside the overall (primary)
score, each row has the 2025/2026 secondary score (`scoring.secondary`); per_concept.csv holds
the stacked ensemble's support, F1 and average precision for every concept, by frequency band.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from conceptclef.core.config import Config
from conceptclef.data.concepts import read_category_file, read_concept_file
from conceptclef.data.concepts import read_cui_names
from conceptclef.data.modalities import ModalityMapping, derive_categories
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.modality import one_modality
from conceptclef.ensemble.nonempty import at_least_one_concept
from conceptclef.ensemble.decoding import make_decider
from conceptclef.ensemble.folds import fold_splits, image_folds
from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.mixing import assigned_block, category_positions, routed_index
from conceptclef.ensemble.sparse_ops import at_least_csr, top_k_csr
from conceptclef.ensemble.thresholds import ConceptThresholdTuner
from conceptclef.pipeline.stages.train_networks import read_confusion
from conceptclef.pipeline.stages.concept_report import concept_report
from conceptclef.pipeline.run.category_record import categories_from_labels
from conceptclef.pipeline.image_sets import load_unlabelled_set
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.stages.cross_fit import out_of_fold_confusion
from conceptclef.pipeline.stages.predict import load_run_models, unlabelled_images_at_size
from conceptclef.pipeline.stages.reports import write_ablation_report
from conceptclef.pipeline.run.directory import Manifest, load_run_config, prediction_cache_dir
from conceptclef.pipeline.run.output_paths import RunInputs
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.stages.stacking import (
    BaseOutputs,
    FittedEnsemble,
    load_oof_probabilities,
    load_validation_outputs,
    load_validation_truth,
    to_stacking_inputs,
)
from conceptclef.scoring.baselines import best_most_frequent_k, most_frequent_predictions
from conceptclef.scoring.f1 import per_image_f1_sparse
from conceptclef.scoring.secondary import outside_counts as secondary_outside_counts
from conceptclef.scoring.secondary import per_image_subset_f1_sparse

log = logging.getLogger("conceptclef")

CUI_MAPPING_FILE = "cui_mapping.csv"  # the 2026 data's concept names (CUI, canonical name)


@dataclass
class LabelledOutputs:
    """Base outputs on a labelled image set, with the truth over the global vocabulary."""

    outputs: BaseOutputs
    truth: sp.csr_matrix
    truth_outside: np.ndarray
    true_categories: list[str] | None
    secondary_outside: np.ndarray | None = None  # secondary-list CUIs of each image outside the vocabulary


# Every decision rule labels at most max_labels <= 100 concepts per image (the checker's limit),
# so the rows tuned on a dense (images x concepts) matrix see each image's 100 most probable
# concepts: 1.9 million entries instead of 51 million at full 2026 size (19,240 x 2,646).
ABLATION_TOP_K = 100


def routed_probs(inputs: StackingInputs, categories: list[str] | None = None) -> sp.csr_matrix:
    """Each image's top `ABLATION_TOP_K` probabilities from the model of `categories[i]` (by default
    the router's choice; the global model when the category has none), built in blocks of images;
    absent where that model does not know a concept."""
    assigned = routed_index(inputs.router_probs) if categories is None else category_positions(inputs, categories)
    return top_k_csr(lambda rows: assigned_block(inputs, assigned[rows], rows), (inputs.n_images, inputs.n_concepts), ABLATION_TOP_K)


def top_probs(probs: np.ndarray) -> sp.csr_matrix:
    """A dense (or memory-mapped) probability matrix reduced to each image's top `ABLATION_TOP_K`, in blocks."""
    return top_k_csr(probs, probs.shape, ABLATION_TOP_K)


def averaged_probs(inputs: StackingInputs) -> sp.csr_matrix:
    """Top `ABLATION_TOP_K` per image of the average of the global and routed models (NaN of the routed model read as 0)."""
    assigned = routed_index(inputs.router_probs)

    def block(rows: slice) -> np.ndarray:
        routed = np.nan_to_num(assigned_block(inputs, assigned[rows], rows), nan=0.0)
        return 0.5 * (np.asarray(inputs.global_probs[rows], dtype=np.float32) + routed)

    return top_k_csr(block, (inputs.n_images, inputs.n_concepts), ABLATION_TOP_K)


def at_published_threshold(probs: np.ndarray) -> sp.csr_matrix:
    """The published baseline: every concept with probability >= 0.5, built in blocks."""
    return sp.csr_matrix(at_least_csr(probs, probs.shape, 0.5), dtype=bool)


def router_choice(outputs: BaseOutputs) -> list[str]:
    return [outputs.router_categories[index] for index in routed_index(outputs.router_probs)]


FoldDecider = Callable[[np.ndarray, np.ndarray], sp.spmatrix]  # (rows to fit on, rows to decide) -> decisions


def cross_fitted(shape: tuple[int, int], config: Config, decide: FoldDecider) -> sp.csr_matrix:
    """Decisions for every image from a rule fitted on the other folds only (the ensemble's folds)."""
    decisions = sp.lil_matrix(shape, dtype=bool)
    for rest, held in fold_splits(image_folds(shape[0], config.ensemble.folds, config.seed)):
        decisions[held] = decide(rest, held)
    return decisions.tocsr()


def cross_fitted_threshold_decisions(probs: sp.csr_matrix, truth: sp.csr_matrix, outside: np.ndarray, config: Config) -> sp.csr_matrix:
    """Decisions for every image from thresholds tuned on the other folds only."""
    return cross_fitted(
        probs.shape, config, lambda rest, held: make_tuner(config).fit(probs[rest], truth[rest], outside[rest]).predict(probs[held])
    )


def cross_fitted_most_frequent_decisions(frequency: np.ndarray, truth: sp.csr_matrix, outside: np.ndarray, config: Config) -> sp.csr_matrix:
    """The trivial floor on validation: every image gets the top-k concepts, k chosen on the other folds."""

    def decide(rest: np.ndarray, held: np.ndarray) -> sp.spmatrix:
        _, k = best_most_frequent_k(frequency, truth[rest], outside[rest])
        return most_frequent_predictions(frequency, len(held), k)

    return cross_fitted(truth.shape, config, decide)


MOST_FREQUENT_ROW = "most frequent training concepts (trivial floor)"


def extra_global_row(name: str) -> str:
    """The ablation row of an extra global model alone (global-<name>, thresholds tuned like the global model's)."""
    return f"global-{name} + tuned thresholds"


def make_tuner(config: Config) -> ConceptThresholdTuner:
    return ConceptThresholdTuner.from_config(config.ensemble)


def scores_by_image(decisions: sp.spmatrix, labelled: LabelledOutputs) -> np.ndarray:
    return per_image_f1_sparse(decisions, labelled.truth, labelled.truth_outside)


def run_ablation(
    run_dir: Path,
    out_dir: Path,
    images_dir: Path | None = None,
    truth_path: Path | None = None,
    categories_path: Path | None = None,
    cui_names_path: Path | None = None,
) -> str:
    layout = RunLayout(Path(run_dir))
    manifest = Manifest.load(layout)
    config = load_run_config(layout)
    if (images_dir is None) != (truth_path is None):
        raise RunDirectoryError("ablation: give both --images and --gt, or neither (validation figures)")
    names = _concept_names(manifest, cui_names_path)
    global_dir = layout.fold(0).global_dir if config.development.scheme == "cross_fit" else layout.global_dir
    vocabulary = ConceptVocabulary.load(layout.files(global_dir).vocabulary)
    ensemble = FittedEnsemble.load(layout, config, manifest, vocabulary)
    validation = _validation_outputs(layout, manifest, config)
    if images_dir is None or truth_path is None:  # both or neither: checked above
        rows, labelled, stacked_probs = _validation_rows(layout, config, vocabulary, validation, ensemble)
        source = "validation (out-of-fold)"
    else:
        labelled = _test_outputs(layout, manifest, config, vocabulary, Path(images_dir), Path(truth_path), categories_path)
        rows, stacked_probs = _test_rows(config, vocabulary, validation, labelled, ensemble)
        source = f"{images_dir}"
        if config.development.scheme == "final_fit":
            source += (
                " (final fit: every row scores the networks retrained on train + valid; the tuned thresholds, stacker and "
                "decision rule are the split run's, fitted on its networks' valid outputs)"
            )
    group_names = labelled.true_categories or router_choice(labelled.outputs)
    table = _score_table(rows, labelled, group_names, list(vocabulary.cuis))
    secondary_table = secondary_by_group(rows, labelled, group_names, list(vocabulary.cuis))
    per_concept = concept_report(
        vocabulary.cuis, rows[f"stacked ensemble ({ensemble.rule})"], stacked_probs, labelled.truth,
        ensemble.statistics.concept_frequency, names,
    )
    confusion = _confusion(labelled, manifest) or (
        out_of_fold_confusion(layout, config.development.folds) if config.development.scheme == "cross_fit" else read_confusion(layout)
    )
    return write_ablation_report(
        Path(out_dir),
        table,
        source=source,
        grouped_by="true category" if labelled.true_categories else "routed category",
        confusion=confusion,
        threshold_curves={
            "global model": (labelled.outputs.global_probs, labelled),
            "stacked ensemble": (stacked_probs, labelled),
        },
        fallback_categories=manifest.fallback_categories,
        per_concept=per_concept,
        secondary_table=secondary_table,
    )


def _concept_names(manifest: Manifest, cui_names_path: Path | None) -> dict[str, str] | None:
    """Names from --cui-names, else from the data folder's cui_mapping.csv (2026) when it has one."""
    if cui_names_path is not None:
        return read_cui_names(cui_names_path)
    default = Path(manifest.data_dir) / CUI_MAPPING_FILE
    return read_cui_names(default) if default.is_file() else None


def _validation_outputs(layout: RunLayout, manifest: Manifest, config: Config) -> LabelledOutputs:
    outputs = load_validation_outputs(layout, manifest, config)
    saved = load_validation_truth(layout)
    if saved.image_ids != outputs.image_ids:
        raise RunDirectoryError(f"{layout.ensemble_dir}: saved validation truth does not match the saved predictions")
    if saved.secondary_outside is None:
        log.warning("%s: made before the secondary score was saved; secondary CUIs outside the vocabulary are not counted "
                    "(rerun `train-all --only ensemble` to count them)", layout.validation_truth_path)
    return LabelledOutputs(outputs, saved.truth, saved.outside, saved.categories, saved.secondary_outside)


def _validation_rows(
    layout: RunLayout, config: Config, vocabulary: ConceptVocabulary, labelled: LabelledOutputs, ensemble: FittedEnsemble
) -> tuple[dict[str, sp.csr_matrix], LabelledOutputs, sp.csr_matrix]:
    outputs = labelled.outputs
    truth, outside = labelled.truth, labelled.truth_outside
    inputs = to_stacking_inputs(outputs, vocabulary, ensemble.statistics, ensemble.knn)
    frequency = ensemble.statistics.concept_frequency
    rows: dict[str, sp.csr_matrix] = {
        MOST_FREQUENT_ROW: cross_fitted_most_frequent_decisions(frequency, truth, outside, config),
        "global @ 0.5 (published baseline)": at_published_threshold(outputs.global_probs),
        "global + tuned thresholds": cross_fitted_threshold_decisions(top_probs(outputs.global_probs), truth, outside, config),
        **{
            extra_global_row(name): cross_fitted_threshold_decisions(top_probs(probs), truth, outside, config)
            for name, probs in outputs.extra_global_probs.items()
        },
        "per-category, routed + tuned thresholds": cross_fitted_threshold_decisions(routed_probs(inputs), truth, outside, config),
    }
    if labelled.true_categories is not None:
        oracle = routed_probs(inputs, labelled.true_categories)
        rows["per-category, oracle routing + tuned thresholds"] = cross_fitted_threshold_decisions(oracle, truth, outside, config)
    rows["average(global, routed) + tuned thresholds"] = cross_fitted_threshold_decisions(averaged_probs(inputs), truth, outside, config)
    _, oof = load_oof_probabilities(layout)
    stacked = at_least_one_concept(_cross_fitted_ensemble_decisions(oof, labelled, config, ensemble.rule), oof, frequency)
    if ensemble.modality is not None:  # the one-modality rule, as predict applies it
        stacked = one_modality(stacked, oof, outputs.router_probs, ensemble.modality.category, ensemble.modality.several_position)
    rows[f"stacked ensemble ({ensemble.rule})"] = stacked
    return rows, labelled, oof


def _cross_fitted_ensemble_decisions(oof: sp.csr_matrix, labelled: LabelledOutputs, config: Config, rule: str) -> sp.csr_matrix:
    """The run's decision rule, fitted on the other folds' out-of-fold probabilities, like every other row."""
    truth, outside = labelled.truth, labelled.truth_outside

    def decide(rest: np.ndarray, held: np.ndarray) -> sp.spmatrix:
        return make_decider(rule, config.ensemble).fit(oof[rest], truth[rest], outside[rest]).predict(oof[held])

    return cross_fitted(oof.shape, config, decide)


def _test_outputs(
    layout: RunLayout,
    manifest: Manifest,
    config: Config,
    vocabulary: ConceptVocabulary,
    images_dir: Path,
    truth_path: Path,
    categories_path: Path | None,
) -> LabelledOutputs:
    truth_by_id = read_concept_file(truth_path)
    with prediction_cache_dir(images_dir, config, RunInputs.of(layout).data_dir) as cache_dir:
        image_set, _ = load_unlabelled_set(images_dir, config, cache_dir)
        missing = [image_id for image_id in image_set.image_ids if image_id not in truth_by_id]
        if missing:
            raise RunDirectoryError(f"{truth_path}: no ground truth for {len(missing)} images of {images_dir}, e.g. {missing[:3]}")
        at_size = unlabelled_images_at_size(images_dir, config, cache_dir, image_set)
        outputs = load_run_models(layout, manifest, config).predict(image_set, at_size)
    concept_lists = [truth_by_id[image_id] for image_id in image_set.image_ids]
    true_categories = None
    if categories_path is not None:
        by_id = read_category_file(Path(categories_path))
        true_categories = [by_id.get(image_id, "unknown") for image_id in image_set.image_ids]
    elif all(record.category for record in image_set.records):
        true_categories = [str(record.category) for record in image_set.records]
    elif categories_from_labels(layout):  # flat test folder: the truth's modality CUIs, as train-all derived them
        true_categories = derive_categories(concept_lists, ModalityMapping.from_config(config.categories)).categories
    return LabelledOutputs(
        outputs,
        vocabulary.encode(concept_lists),
        vocabulary.outside_counts(concept_lists),
        true_categories,
        secondary_outside_counts(concept_lists, vocabulary.cuis),
    )


def _test_rows(
    config: Config, vocabulary: ConceptVocabulary, validation: LabelledOutputs, labelled: LabelledOutputs, ensemble: FittedEnsemble
) -> tuple[dict[str, sp.csr_matrix], sp.csr_matrix]:
    def tuned(valid_probs: sp.csr_matrix, test_probs: sp.csr_matrix) -> sp.csr_matrix:
        tuner = make_tuner(config).fit(valid_probs, validation.truth, validation.truth_outside)
        return sp.csr_matrix(tuner.predict(test_probs), dtype=bool)

    outputs, valid_outputs = labelled.outputs, validation.outputs
    inputs = to_stacking_inputs(outputs, vocabulary, ensemble.statistics, ensemble.knn)
    valid_inputs = to_stacking_inputs(valid_outputs, vocabulary, ensemble.statistics, ensemble.knn)
    frequency = ensemble.statistics.concept_frequency
    _, k = best_most_frequent_k(frequency, validation.truth, validation.truth_outside)
    rows: dict[str, sp.csr_matrix] = {
        MOST_FREQUENT_ROW: most_frequent_predictions(frequency, labelled.truth.shape[0], k),
        "global @ 0.5 (published baseline)": at_published_threshold(outputs.global_probs),
        "global + tuned thresholds": tuned(top_probs(valid_outputs.global_probs), top_probs(outputs.global_probs)),
        **{
            extra_global_row(name): tuned(top_probs(valid_outputs.extra_global_probs[name]), top_probs(probs))
            for name, probs in outputs.extra_global_probs.items()
        },
        "per-category, routed + tuned thresholds": tuned(routed_probs(valid_inputs), routed_probs(inputs)),
    }
    if labelled.true_categories is not None and validation.true_categories is not None:
        rows["per-category, oracle routing + tuned thresholds"] = tuned(
            routed_probs(valid_inputs, validation.true_categories), routed_probs(inputs, labelled.true_categories)
        )
    rows["average(global, routed) + tuned thresholds"] = tuned(averaged_probs(valid_inputs), averaged_probs(inputs))
    stacked = sp.csr_matrix(ensemble.stacker.predict_proba(inputs), dtype=np.float32)
    # Topped up to one concept per image exactly as predict writes the submission.
    rows[f"stacked ensemble ({ensemble.rule})"] = ensemble.decide(stacked, outputs.router_probs)
    return rows, stacked


def _score_table(rows: dict[str, sp.csr_matrix], labelled: LabelledOutputs, group_names: list[str], cuis: list[str]) -> pd.DataFrame:
    groups = np.array(group_names)
    records = []
    for name, decisions in rows.items():
        per_image = scores_by_image(decisions, labelled)
        scored = ~np.isnan(per_image)
        secondary = per_image_subset_f1_sparse(decisions, labelled.truth, cuis, truth_outside=labelled.secondary_outside)
        record = {
            "system": name,
            "overall": float(per_image[scored].mean()) if scored.any() else 0.0,
            "secondary": float(np.nanmean(secondary)) if np.isfinite(secondary).any() else np.nan,
            "n_images": int(scored.sum()),
        }
        for group in sorted(set(group_names)):
            members = scored & (groups == group)
            record[group] = float(per_image[members].mean()) if members.any() else np.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def secondary_by_group(rows: dict[str, sp.csr_matrix], labelled: LabelledOutputs, group_names: list[str], cuis: list[str]) -> pd.DataFrame:
    """Each row's secondary score (modality and X-ray region CUIs) overall and per category: where
    routing on flat data loses the modality, the category it loses it in (NaN: no image of the
    category has a secondary CUI)."""
    groups = np.array(group_names)
    records = []
    for name, decisions in rows.items():
        secondary = per_image_subset_f1_sparse(decisions, labelled.truth, cuis, truth_outside=labelled.secondary_outside)
        scored = np.isfinite(secondary)
        record: dict[str, object] = {"system": name, "secondary": float(secondary[scored].mean()) if scored.any() else np.nan,
                                     "n_images": int(scored.sum())}
        for group in sorted(set(group_names)):
            members = scored & (groups == group)
            record[group] = float(secondary[members].mean()) if members.any() else np.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def _confusion(labelled: LabelledOutputs, manifest: Manifest) -> tuple[list[str], np.ndarray] | None:
    if labelled.true_categories is None:
        return None
    categories = list(manifest.categories)
    index = {name: position for position, name in enumerate(categories)}
    matrix = np.zeros((len(categories), len(categories)), dtype=np.int64)
    for true, predicted in zip(labelled.true_categories, router_choice(labelled.outputs)):
        if true in index:
            matrix[index[true], index[predicted]] += 1
    return categories, matrix
