"""Cross-fitted networks: every development image (train + valid) teaches the networks and the ensemble.

With `[development] scheme = "cross_fit"` the development images are split into K folds
(`pipeline.run.development_folds`); every network of the run's table trains once per fold, in
RUN/folds/fold-<k>/, on the other folds, and saves its predictions on its held-out fold. This
module gathers those out-of-fold predictions into one set per network over every development
image (RUN/out-of-fold/, float16, read back as memory maps), so the stacker and the decision rule
are cross-fitted on all development images, and at test time averages the K fold networks of
each kind (`CrossFitModels`).

kNN scores follow the networks: each fold's global model embeds its fold's training images (its
own index, RUN/folds/fold-<k>/ensemble/knn_index.npz) and its held-out fold (the out-of-fold
queries); a test image gets the mean of the K folds' kNN scores, each from its fold's model and
index, since embeddings of two fold models live in different spaces.

Vocabularies (global and per category) and the categories' model-or-fallback decisions come from
all development images, so every fold network of a kind has the same columns and their outputs
average directly. The concept frequencies the stacker sees are the development set's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.core.config import Config
from conceptclef.core.runfiles import atomic_save_sparse, load_sparse, read_json
from conceptclef.data.modalities import ModalityMapping
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.knn import NearestNeighbourScorer
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.image_sets import ImagesAtSize, ImageSet, cached_images
from conceptclef.pipeline.run.development_folds import FoldRows, development_folds, fold_rows, fold_seed
from conceptclef.pipeline.run.directory import Manifest
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.run.networks import run_networks
from conceptclef.pipeline.stages.predict import RunModels
from conceptclef.pipeline.stages.stacking import (
    BaseOutputs,
    ConceptStatistics,
    fit_stacker_and_rule,
    load_knn_scorer,
    save_knn_index,
    to_stacking_inputs,
)
from conceptclef.pipeline.stages.train_networks import ModelPredictions

log = logging.getLogger("conceptclef")

__all__ = [
    "CrossFitModels",
    "cross_fitted",
    "development_fold_numbers",
    "development_set",
    "fit_cross_fitted_ensemble",
    "fold_image_rows",
    "load_out_of_fold_outputs",
    "out_of_fold_confusion",
]


def cross_fitted(config: Config) -> bool:
    return config.development.scheme == "cross_fit"


_DEVELOPMENT_SETS: dict[str, ImageSet] = {}  # per process: every fold network of a worker reads the same set


def development_set(train: ImageSet, valid: ImageSet, config: Config, cache_dir: Path) -> ImageSet:
    """train + valid as one image set over ONE cached array (train's rows, then valid's).

    One array, not two: a fold's images are then row subsets of it, and the frozen-backbone
    feature store (keyed by the array and its rows) computes each image's features once for every
    fold of every head-mode network. It costs one more image cache of train + valid.
    """
    records = list(train.records) + list(valid.records)
    key = hashlib.sha256("\n".join([str(cache_dir), str(config.data.image_size), *(str(record.path) for record in records)]).encode()).hexdigest()
    if key not in _DEVELOPMENT_SETS:
        kept, images, bad = cached_images(records, config, cache_dir, keep_bad=True)
        if bad:  # train and valid were readable a moment ago
            raise RunDirectoryError(f"{kept[bad[0]].path}: became unreadable while train-all was running")
        _DEVELOPMENT_SETS[key] = ImageSet(kept, images, train.known_concepts + valid.known_concepts)
    return _DEVELOPMENT_SETS[key]


def development_fold_numbers(config: Config, development: ImageSet) -> np.ndarray:
    """Each development image's fold (stratified by category, seeded by development.fold_seed)."""
    categories = [str(category) for category in development.categories]
    return development_folds(categories, config.development.folds, fold_seed(config.development.fold_seed, config.seed))


def fold_image_rows(config: Config, development: ImageSet, fold: int) -> FoldRows:
    """The development rows fold `fold`'s networks fit on, early-stop on and predict."""
    categories = [str(category) for category in development.categories]
    return fold_rows(
        categories,
        development_fold_numbers(config, development),
        fold,
        config.development.stopping_fraction,
        fold_seed(config.development.fold_seed, config.seed),
    )


def fit_cross_fitted_ensemble(
    layout: RunLayout, config: Config, manifest: Manifest, development: ImageSet, vocabulary: ConceptVocabulary
) -> None:
    """Gather the fold networks' out-of-fold outputs, then fit the stacker and decision rule on them."""
    mapping = ModalityMapping.from_config(config.categories) if config.ensemble.modality_features else None
    statistics = ConceptStatistics.from_training(development, vocabulary, manifest.categories, mapping)
    statistics.save(layout.concept_statistics_path)
    labels = development.labels(vocabulary)
    folds = [fold_image_rows(config, development, fold) for fold in range(config.development.folds)]
    _gather_knn_scores(layout, config, development, labels, folds)
    _gather_predictions(layout, config, manifest, development, folds)
    outputs = load_out_of_fold_outputs(layout, manifest, config)
    if outputs.image_ids != development.image_ids:
        raise RunDirectoryError(f"{layout.out_of_fold_dir}: development images differ from the data's")
    log.info("ensemble: fitting on the out-of-fold outputs of %d development images (%d folds)", len(outputs.image_ids), len(folds))
    inputs = to_stacking_inputs(outputs, vocabulary, statistics, None)
    fit_stacker_and_rule(layout, config, manifest, outputs, inputs, development, vocabulary, statistics)


def _gather_knn_scores(layout: RunLayout, config: Config, development: ImageSet, labels: sp.csr_matrix, folds: list[FoldRows]) -> None:
    """Each fold's kNN index (its global model's embeddings of its training rows) and its held-out
    rows' kNN scores, put back in the development order."""
    blocks: list[sp.csr_matrix] = []
    for rows in folds:
        fold_layout = layout.fold(rows.fold)
        files = fold_layout.files(fold_layout.global_dir)
        index = ModelPredictions.load(files.train_embeddings)
        if index.image_ids != [development.image_ids[row] for row in rows.training] or index.embeddings is None:
            raise RunDirectoryError(f"{files.train_embeddings}: the fold's training images differ from the data's")
        save_knn_index(fold_layout.knn_index_path, np.asarray(index.embeddings), labels[rows.training])
        queries = _held_out_predictions(files.validation_predictions, development, rows)
        if queries.embeddings is None:
            raise RunDirectoryError(f"{files.validation_predictions}: holds no embeddings (the kNN queries)")
        knn = load_knn_scorer(fold_layout.knn_index_path, config.ensemble.knn_neighbours)
        blocks.append(sp.csr_matrix(knn.predict(np.asarray(queries.embeddings)), dtype=np.float32))
    order = np.concatenate([rows.held_out for rows in folds])
    scores = sp.vstack(blocks, format="csr")[np.argsort(order, kind="stable")]
    atomic_save_sparse(layout.out_of_fold_knn_path, scores, image_ids=np.array(development.image_ids))


def _held_out_predictions(path: Path, development: ImageSet, rows: FoldRows) -> ModelPredictions:
    saved = ModelPredictions.load(path)
    if saved.image_ids != [development.image_ids[row] for row in rows.held_out]:
        raise RunDirectoryError(f"{path}: the held-out images of fold {rows.fold} differ from the data's")
    return saved


def _gather_predictions(layout: RunLayout, config: Config, manifest: Manifest, development: ImageSet, folds: list[FoldRows]) -> None:
    """Every network kind's held-out predictions of every fold, as one float16 matrix per kind over
    the development images (one kind in memory at a time: 116,000 x 2,646 float16 is 0.6 GB)."""
    tables = {rows.fold: run_networks(layout, config, manifest.categories, manifest.fallback_categories, fold=rows.fold) for rows in folds}
    kinds = tables[0]
    for position, kind in enumerate(kinds):
        gathered: np.ndarray | None = None
        for rows in folds:
            network = tables[rows.fold][position]
            saved = _held_out_predictions(network.files.validation_predictions, development, rows)
            if gathered is None:
                gathered = np.empty((len(development.records), saved.probs.shape[1]), dtype=np.float16)
            if saved.probs.shape[1] != gathered.shape[1]:
                raise RunDirectoryError(f"{network.files.validation_predictions}: {saved.probs.shape[1]} columns, fold 0 has {gathered.shape[1]}")
            gathered[rows.held_out] = saved.probs
        assert gathered is not None  # at least 2 folds
        target = layout.out_of_fold_dir / kind.name
        ModelPredictions(development.image_ids, gathered).save(RunLayout.files(target).validation_predictions)
        del gathered


def load_out_of_fold_outputs(layout: RunLayout, manifest: Manifest, config: Config) -> BaseOutputs:
    """What `stacking.load_validation_outputs` gives for a cross-fitted run: every network kind's
    out-of-fold probabilities (memory maps) and the out-of-fold kNN scores, over the development images."""
    kinds = run_networks(layout, config, manifest.categories, manifest.fallback_categories, fold=0)
    saved = {}
    for kind in kinds:
        path = RunLayout.files(layout.out_of_fold_dir / kind.name).validation_predictions
        if not path.is_file():
            raise RunDirectoryError(f"{path}: missing; rerun `train-all --only ensemble` to gather the out-of-fold outputs")
        saved[kind.name] = ModelPredictions.load(path)
    image_ids = saved["global"].image_ids
    for kind in kinds:
        if saved[kind.name].image_ids != image_ids:
            raise RunDirectoryError(f"{layout.out_of_fold_dir / kind.name}: development images differ from the global model's")
    knn_scores, arrays = load_sparse(layout.out_of_fold_knn_path)
    if [str(image_id) for image_id in arrays["image_ids"]] != image_ids:
        raise RunDirectoryError(f"{layout.out_of_fold_knn_path}: development images differ from the global model's")
    return BaseOutputs.from_saved(saved, kinds, list(manifest.categories), np.zeros((len(image_ids), 0), np.float32), knn_scores)


def out_of_fold_confusion(layout: RunLayout, folds: int) -> tuple[list[str], np.ndarray]:
    """The routers' confusion matrices on their held-out folds, summed: every development image once."""
    categories: list[str] = []
    total: np.ndarray | None = None
    for fold in range(folds):
        fold_layout = layout.fold(fold)
        payload = read_json(fold_layout.files(fold_layout.router_dir).confusion)
        matrix = np.array(payload["matrix"], dtype=np.int64)
        if total is None:
            categories, total = list(payload["categories"]), matrix
        elif list(payload["categories"]) != categories:
            raise RunDirectoryError(f"{fold_layout.router_dir}: router categories differ from fold 0's")
        else:
            total = total + matrix
    assert total is not None
    return categories, total


@dataclass
class CrossFitModels:
    """The K fold networks of a cross-fitted run; `predict` averages each kind over the folds."""

    folds: list[RunModels]
    knn: list[NearestNeighbourScorer]

    @classmethod
    def load(cls, layout: RunLayout, manifest: Manifest, config: Config) -> "CrossFitModels":
        folds = [RunModels.load(layout, manifest, config, fold=fold) for fold in range(config.development.folds)]
        for fold, models in enumerate(folds):
            if list(models.vocabulary.cuis) != list(folds[0].vocabulary.cuis):
                raise RunDirectoryError(f"{layout.fold(fold).global_dir}: vocabulary differs from fold 0's")
        knn = []
        for fold in range(config.development.folds):
            path = layout.fold(fold).knn_index_path
            if not path.is_file():
                raise RunDirectoryError(f"{path}: missing; rerun `train-all --only ensemble`")
            knn.append(load_knn_scorer(path, config.ensemble.knn_neighbours))
        return cls(folds, knn)

    @property
    def vocabulary(self) -> ConceptVocabulary:
        return self.folds[0].vocabulary

    @property
    def category_models(self) -> dict:
        return self.folds[0].category_models

    @property
    def extra_global_models(self) -> dict:
        return self.folds[0].extra_global_models

    def predict(self, image_set: ImageSet, images_at_size: ImagesAtSize | None = None) -> BaseOutputs:
        """The mean over folds of every kind's probabilities and of the folds' kNN scores."""
        total: BaseOutputs | None = None
        knn_total: sp.csr_matrix | None = None
        for models, knn in zip(self.folds, self.knn):
            outputs = models.predict(image_set, images_at_size)
            scores = sp.csr_matrix(knn.predict(outputs.global_embeddings), dtype=np.float32)
            knn_total = scores if knn_total is None else knn_total + scores
            if total is None:
                total = outputs
                # float32 sums of K values: 15,000 test images x 2,646 concepts is 160 MB a kind
                total.router_probs = np.array(outputs.router_probs, dtype=np.float32)
                total.global_probs = np.array(outputs.global_probs, dtype=np.float32)
                total.category_probs = {name: np.array(p, dtype=np.float32) for name, p in outputs.category_probs.items()}
                total.extra_global_probs = {name: np.array(p, dtype=np.float32) for name, p in outputs.extra_global_probs.items()}
                continue
            total.router_probs += outputs.router_probs
            total.global_probs += outputs.global_probs
            for name, probs in outputs.category_probs.items():
                total.category_probs[name] += probs
            for name, probs in outputs.extra_global_probs.items():
                total.extra_global_probs[name] += probs
        assert total is not None and knn_total is not None
        k = len(self.folds)
        total.router_probs /= k
        total.global_probs /= k
        for probs in [*total.category_probs.values(), *total.extra_global_probs.values()]:
            probs /= k
        total.global_embeddings = np.zeros((len(total.image_ids), 0), np.float32)
        total.knn_scores = sp.csr_matrix(knn_total / k, dtype=np.float32)
        return total
