"""Train the base networks of a run and keep their validation predictions as files.

Each model writes its predictions on every validation image (not only its own category's),
because the stacker learns how much to trust each model everywhere, and the router's mistakes
send images to the "wrong" category model at test time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import Config, TrainingConfig
from conceptclef.core.runfiles import atomic_save_arrays, atomic_write_json, map_arrays, read_json
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.pipeline.stages import tta
from conceptclef.pipeline.stages.reports import plot_confusion, write_confusion_csv
from conceptclef.pipeline.image_sets import ImageSet, routed_subset
from conceptclef.pipeline.devices.ranks import is_main_process
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.data.modalities import ModalityMapping
from conceptclef.pipeline.run.category_record import categories_from_labels
from conceptclef.router import ModalityRouter, SingleCategoryRouter, router_class_for
from conceptclef.router.modality_cuis import ModalityCuiRouter
from conceptclef.scoring.baselines import majority_class_accuracy, most_frequent_concepts_f1
from conceptclef.training.feature_registry import feature_store_for
from conceptclef.training.replay import StepReplay

log = logging.getLogger("conceptclef")


@dataclass(frozen=True)
class ModelPredictions:
    """One model's outputs on one image set."""

    image_ids: list[str]
    probs: np.ndarray
    embeddings: np.ndarray | None = None

    def save(self, path: Path) -> None:
        if not is_main_process():
            return
        arrays = {"image_ids": np.array(self.image_ids), "probs": self.probs}
        if self.embeddings is not None:
            arrays["embeddings"] = self.embeddings
        atomic_save_arrays(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> "ModelPredictions":
        """The saved outputs; probabilities and embeddings as read-only memory maps of the file
        (any float dtype), so a stage reads only the rows it uses, block by block."""
        arrays = map_arrays(path)
        return cls(
            image_ids=[str(image_id) for image_id in arrays["image_ids"]],
            probs=arrays["probs"],
            embeddings=arrays.get("embeddings"),
        )


def train_router(
    layout: RunLayout, config: Config, train: ImageSet, valid: ImageSet, predicted: ImageSet | None, replay: StepReplay | None = None
) -> ModalityRouter | SingleCategoryRouter:
    """Train the router (nothing to train for a single category) and save its probabilities on
    `predicted` (the stacker's inputs: the validation images, or a fold's held-out images). The
    final fit gives `replay` (a fixed budget), an empty `valid` and no `predicted`: nothing is saved
    but the model."""
    work_dir = layout.router_dir
    train, valid = routed_subset(train), routed_subset(valid)  # images without a derived category teach no class
    train_categories, valid_categories = [str(c) for c in train.categories], [str(c) for c in valid.categories]
    single = router_class_for(sorted(set(train_categories))) is SingleCategoryRouter
    router: ModalityRouter | SingleCategoryRouter
    if single:
        router = SingleCategoryRouter().fit(train_categories, valid_categories, work_dir)
        log.info("router: one category (%s); every image goes to it, nothing to train", router.categories_[0])
    elif config.categories.modality_model == "cuis" and categories_from_labels(layout):
        mapping = ModalityMapping.from_config(config.categories)
        cui_router = ModalityCuiRouter(
            config.router, config.data.image_size, config.device, config.seed, config.data.num_workers, feature_store_for(config.data), replay
        )
        router = cui_router.fit_cuis(
            train.images, train.known_concepts, valid.images, valid.known_concepts, mapping.cuis_by_category(),
            sorted(set(train_categories)), mapping.several, work_dir,
        )
        log.info("router: one sigmoid per modality CUI (%s), categories read from them", ", ".join(cui_router.cuis_))
    else:
        modality_router = ModalityRouter(
            config.router, config.data.image_size, config.device, config.seed, config.data.num_workers, feature_store_for(config.data), replay
        )
        router = modality_router.fit(train.images, train_categories, valid.images, valid_categories, work_dir)
    if predicted is None:
        return router  # the final fit: nothing held out to predict
    log.info("router: predicting the %d validation images%s", len(predicted.records), " and their mirrors (flip_tta)" if config.router.flip_tta else "")
    probs = tta.predict_proba(router, predicted.images)  # the stacker needs the router's view of every image
    ModelPredictions(predicted.image_ids, probs.astype(np.float32)).save(RunLayout.files(work_dir).validation_predictions)
    if router.confusion_ is not None:  # a fitted router always has one
        _write_confusion(work_dir, router.categories_, router.confusion_)
    if single:  # no trained router to hold against a baseline
        return router
    chance = majority_class_accuracy(np.array(train_categories), np.array(valid_categories))
    _write_baseline(work_dir, "accuracy", router.valid_accuracy_, "most frequent category", chance)
    log.info(
        "router: validation accuracy %.3f over %d images (always the most frequent category: %.3f)",
        router.valid_accuracy_, len(valid.records), chance,
    )
    return router


def _write_baseline(work_dir: Path, metric: str, model_score: float, baseline: str, baseline_score: float, **extra: object) -> None:
    """Record the model's validation score beside a trivial predictor's, and warn when it does not win."""
    beats = model_score > baseline_score
    if not beats:
        log.warning("%s: validation %s %.4f does not beat the %s baseline (%.4f)", work_dir.name, metric, model_score, baseline, baseline_score)
    if is_main_process():
        atomic_write_json(
            RunLayout.files(work_dir).baseline,
            {"metric": metric, "model": model_score, "baseline": baseline, "baseline_score": baseline_score, "beats_baseline": beats, **extra},
        )


def _write_confusion(work_dir: Path, categories: list[str], confusion: np.ndarray) -> None:
    """confusion.json (read back by the ablation), confusion.csv and confusion.png beside it, and
    the validation accuracy of each category in the log: where routing goes wrong, not only how often."""
    matrix = np.asarray(confusion, dtype=np.int64)
    per_category = category_accuracies(categories, matrix)
    if per_category:
        log.info("router: validation accuracy per category: %s", ", ".join(
            f"{category} {accuracy:.3f} ({int(matrix[i].sum())})" for i, (category, accuracy) in enumerate(per_category.items())
        ))
    if not is_main_process():
        return
    files = RunLayout.files(work_dir)
    atomic_write_json(files.confusion, {"categories": list(categories), "matrix": matrix.tolist()})
    write_confusion_csv(list(categories), matrix, files.confusion.with_suffix(".csv"))
    plot_confusion(list(categories), matrix, files.confusion.with_suffix(".png"))


def category_accuracies(categories: list[str], matrix: np.ndarray) -> dict[str, float]:
    """Share of each true category's validation images routed to it (NaN: none in validation)."""
    totals = matrix.sum(axis=1)
    return {category: float(matrix[i, i] / totals[i]) if totals[i] else float("nan") for i, category in enumerate(categories)}


def read_confusion(layout: RunLayout) -> tuple[list[str], np.ndarray]:
    payload = read_json(layout.files(layout.router_dir).confusion)
    return payload["categories"], np.array(payload["matrix"], dtype=np.int64)


def train_concept_model(
    work_dir: Path,
    config: Config,
    training: "ImageSet",
    vocabulary: ConceptVocabulary,
    valid_for_stopping: ImageSet,
    valid_all: ImageSet | None,
    train_all_images: ImageSet | None = None,
    is_global: bool = False,
    settings: TrainingConfig | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    replay: StepReplay | None = None,
) -> ConceptModel:
    """Train one concept model; save its probabilities on all validation images.

    The global model also saves embeddings of the training images (the kNN index) and of the
    validation images (kNN queries), from the same forward passes as its probabilities.
    `settings`, `image_size` and `seed` replace the config's for a specialist started from the
    global model or an extra global model (None: the config's). The final fit gives `replay` (a
    fixed budget), an empty `valid_for_stopping` and no `valid_all`: nothing is saved but the model.
    """
    if settings is None:
        settings = config.global_model if is_global else config.category_model
    if is_main_process():
        vocabulary.save(RunLayout.files(work_dir).vocabulary)
    model = ConceptModel(
        settings, image_size or config.data.image_size, config.device, config.seed if seed is None else seed, config.data.num_workers,
        feature_store_for(config.data), replay,
    )
    train_labels, stopping_labels = training.labels(vocabulary), valid_for_stopping.labels(vocabulary)
    model.fit(training.images, train_labels, list(vocabulary.cuis), valid_for_stopping.images, stopping_labels, work_dir)
    if valid_all is None:
        return model
    log.info("%s: predicting the %d validation images%s", work_dir.name, len(valid_all.records), " and their mirrors (flip_tta)" if settings.flip_tta else "")
    probs, embeddings = tta.predict_proba_and_embed(model, valid_all.images)
    ModelPredictions(valid_all.image_ids, probs.astype(np.float32), embeddings.astype(np.float32) if is_global else None).save(
        RunLayout.files(work_dir).validation_predictions
    )
    if is_global and train_all_images is not None:
        log.info("%s: embedding the %d training images (the kNN index)", work_dir.name, len(train_all_images.records))
        train_embeddings = model.embed(train_all_images.images)
        ModelPredictions(train_all_images.image_ids, np.zeros((len(train_all_images.records), 0), np.float32), train_embeddings.astype(np.float32)).save(
            RunLayout.files(work_dir).train_embeddings
        )
    baseline, k = most_frequent_concepts_f1(train_labels, stopping_labels)
    _write_baseline(work_dir, "sample_f1", model.best_valid_f1_, "most frequent concepts", baseline, k=k)
    log.info(
        "%s: validation sample F1 at 0.5 = %.4f (%d concepts; the %d most frequent concepts for every image: %.4f)",
        work_dir.name, model.best_valid_f1_, len(vocabulary), k, baseline,
    )
    return model
