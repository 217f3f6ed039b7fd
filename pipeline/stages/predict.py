"""`predict`: a submission for a folder of test images, using nothing but the run directory."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import Config, locate_key
from conceptclef.core.runfiles import atomic_save_sparse
from conceptclef.data.submission import canonical_format, write_submission, write_upload_zip
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.pipeline.stages import tta
from conceptclef.pipeline.image_sets import ImagesAtSize, ImageSet, config_at_image_size, load_unlabelled_set, same_images
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.run.output_paths import (
    RunInputs,
    check_images_folder,
    check_not_an_input,
    check_submission_path,
    check_upload_zip_path,
    probabilities_path_for,
)
from conceptclef.pipeline.run.preflight import check_device_available
from conceptclef.pipeline.run.networks import EXTRA_GLOBAL_PREFIX, Network, Role, run_networks
from conceptclef.pipeline.run.directory import Manifest, load_run_config, prediction_cache_dir
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.stages.stacking import BaseOutputs, FittedEnsemble, to_stacking_inputs
from conceptclef.router import ModalityRouter, SingleCategoryRouter
from conceptclef.training.feature_registry import feature_store_for

if TYPE_CHECKING:
    from conceptclef.pipeline.stages.cross_fit import CrossFitModels
    from conceptclef.pipeline.stages.final_fit import FinalFitModels

log = logging.getLogger("conceptclef")

SUBMISSION_FORMATS = ("2020", "2025")


@dataclass
class RunModels:
    """The trained networks of a run, checked against its manifest."""

    router: ModalityRouter | SingleCategoryRouter
    global_model: ConceptModel
    category_models: dict[str, ConceptModel]
    vocabulary: ConceptVocabulary
    extra_global_models: dict[str, ConceptModel] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, layout: RunLayout, manifest: Manifest, config: Config, fold: int | None = None, final_fit: bool = False) -> "RunModels":
        """Every network of the run's table (of one fold's, for cross-fitted networks; the final-fit
        networks with `final_fit`), each checked to be trained, current and on the run's vocabulary."""
        networks = run_networks(layout, config, manifest.categories, manifest.fallback_categories, fold, final_fit)
        for network in networks:
            if not network.is_trained():
                raise RunDirectoryError(f"{network.work_dir}: {network.description} is not trained; rerun train-all")
            outdated = network.outdated_reason(layout)
            if outdated is not None:
                raise RunDirectoryError(f"{network.work_dir}: {network.description} {outdated}; rerun train-all")
        features = feature_store_for(config.data)  # one frozen-backbone pass shared by all head-mode models
        router: ModalityRouter | SingleCategoryRouter | None = None
        global_model: ConceptModel | None = None
        vocabulary: ConceptVocabulary | None = None
        category_models: dict[str, ConceptModel] = {}
        extra_global_models: dict[str, ConceptModel] = {}
        for network in networks:
            model = network.model_class.load(network.work_dir, config.device, features)
            if network.role is Role.ROUTER:
                if list(model.categories_) != list(manifest.categories):
                    raise RunDirectoryError(f"{network.work_dir}: router categories {model.categories_} differ from the run's {manifest.categories}")
                router = model
            elif network.role is Role.GLOBAL:
                vocabulary = _checked_vocabulary(network, manifest.global_vocabulary)
                global_model = model
            elif network.role is Role.EXTRA_GLOBAL:
                if vocabulary is None or list(model.cuis_) != list(vocabulary.cuis):
                    raise RunDirectoryError(f"{network.work_dir}: {network.description} has another vocabulary than the global model")
                extra_global_models[network.name.removeprefix(EXTRA_GLOBAL_PREFIX)] = model
            else:
                _checked_vocabulary(network, manifest.category_vocabularies.get(network.name, ""))
                category_models[network.name] = model
        assert router is not None and global_model is not None and vocabulary is not None  # the table always holds both
        return cls(router, global_model, category_models, vocabulary, extra_global_models)

    def predict(self, image_set: ImageSet, images_at_size: ImagesAtSize | None = None) -> BaseOutputs:
        """Every network's outputs; an extra global model at another image size reads its images from `images_at_size`."""
        images = image_set.images
        global_probs, embeddings = tta.predict_proba_and_embed(self.global_model, images)
        extra_probs = {}
        for name, model in self.extra_global_models.items():
            resized = image_set
            if model.image_size != self.global_model.image_size:
                if images_at_size is None:
                    raise ValueError(f"extra global model {name}: needs the images at {model.image_size} px")
                resized = images_at_size(model.image_size)
            extra_probs[name] = tta.predict_proba(model, resized.images)
        return BaseOutputs(
            image_ids=image_set.image_ids,
            router_probs=tta.predict_proba(self.router, images),
            router_categories=list(self.router.categories_),
            global_probs=global_probs,
            global_embeddings=embeddings,
            category_probs={category: tta.predict_proba(model, images) for category, model in self.category_models.items()},
            category_cuis={category: list(model.cuis_) for category, model in self.category_models.items()},
            extra_global_probs=extra_probs,
        )


def load_run_models(layout: RunLayout, manifest: Manifest, config: Config) -> "RunModels | CrossFitModels | FinalFitModels":
    """The networks `predict` runs: the run's table, with cross-fitted networks every fold's
    (their outputs averaged), with the final fit the final-fit networks (trained on train + valid)."""
    if config.development.scheme == "final_fit":
        from conceptclef.pipeline.stages.final_fit import FinalFitModels  # it builds on RunModels

        return FinalFitModels.load(layout, manifest, config)
    if config.development.scheme == "cross_fit":
        from conceptclef.pipeline.stages.cross_fit import CrossFitModels  # it builds on RunModels

        return CrossFitModels.load(layout, manifest, config)
    return RunModels.load(layout, manifest, config)


def _checked_vocabulary(network: Network, fingerprint: str) -> ConceptVocabulary:
    """The network's saved vocabulary, refused when it is not the one the manifest recorded."""
    vocabulary = ConceptVocabulary.load(network.files.vocabulary)
    if vocabulary.fingerprint() != fingerprint:
        raise RunDirectoryError(f"{network.files.vocabulary}: vocabulary differs from the run's manifest")
    return vocabulary


def unlabelled_images_at_size(images_dir: Path, config: Config, cache_dir: Path, reference: ImageSet) -> ImagesAtSize:
    """Reads the test images again at another size (for extra global models), checked to be the same images."""

    def at_size(image_size: int) -> ImageSet:
        resized, _ = load_unlabelled_set(images_dir, config_at_image_size(config, image_size), cache_dir)
        return same_images(reference, resized, images_dir)

    return at_size


def decisions_to_concepts(decisions: sp.spmatrix, image_ids: list[str], vocabulary: ConceptVocabulary, probs: sp.spmatrix) -> dict[str, list[str]]:
    """Each image's chosen CUIs, most probable first."""
    decisions = sp.csr_matrix(decisions, dtype=bool)
    dense_probs = sp.csr_matrix(probs)
    result: dict[str, list[str]] = {}
    for row, image_id in enumerate(image_ids):
        columns = decisions.indices[decisions.indptr[row] : decisions.indptr[row + 1]]
        scores = np.asarray(dense_probs[row, columns].todense()).ravel() if len(columns) else np.array([])
        ordered = columns[np.argsort(-scores, kind="stable")]
        result[image_id] = [vocabulary.cuis[column] for column in ordered]
    return result


def predict_submission(
    run_dir: Path,
    images_dir: Path,
    out_path: Path,
    submission_format: str = "2020",
    upload_zip: bool = False,
    overwrite: bool = False,
) -> dict:
    """`overwrite` lets the submission replace a file predict did not write (never one in the run or image folder)."""
    submission_format = canonical_format(submission_format) or submission_format
    if submission_format not in SUBMISSION_FORMATS:
        raise RunDirectoryError(f"--format {submission_format}: choose 2020 or 2025 (2026 is the 2025 format)")
    zip_path = upload_zip_path(Path(out_path), submission_format) if upload_zip else None
    started = time.perf_counter()
    layout = RunLayout(Path(run_dir))
    inputs = RunInputs.of(layout)
    check_images_folder(Path(images_dir), inputs)
    written = [Path(out_path), probabilities_path_for(Path(out_path)), *([zip_path] if zip_path is not None else [])]
    check_not_an_input(written, inputs, Path(images_dir))
    protected = {"the run directory": layout.root, "the image folder": Path(images_dir), **inputs.image_folders}
    check_submission_path(Path(out_path), protected, overwrite)
    if zip_path is not None:
        check_upload_zip_path(zip_path, Path(out_path), overwrite)
    manifest = Manifest.load(layout)
    config = load_run_config(layout)
    check_device_available(config.device, locate_key(layout.config_path, ("device",)))
    models = load_run_models(layout, manifest, config)
    ensemble = FittedEnsemble.load(layout, config, manifest, models.vocabulary)
    with prediction_cache_dir(Path(images_dir), config, inputs.data_dir) as cache_dir:
        image_set, bad = load_unlabelled_set(Path(images_dir), config, cache_dir)
        at_size = unlabelled_images_at_size(Path(images_dir), config, cache_dir, image_set)
        log.info("predict: %d images of %s (image cache in %s); running %d networks", len(image_set.records), images_dir, cache_dir, 2 + len(models.category_models) + len(models.extra_global_models))
        outputs = models.predict(image_set, at_size)
    log.info("predict: stacking and deciding the concepts")
    summary = write_predictions(outputs, models.vocabulary, ensemble, Path(out_path), submission_format)
    if zip_path is not None:
        summary["upload_zip"] = str(write_upload_zip(out_path, zip_path))
    return {**summary, "unreadable_images": len(bad), "seconds": round(time.perf_counter() - started, 2)}


def upload_zip_path(out_path: Path, submission_format: str) -> Path:
    """Where `--zip` writes the upload (OUT with .zip), checked before any work starts."""
    if submission_format != "2025":
        raise RunDirectoryError("--zip makes the 2025/2026 upload (a zip of submission.csv); add --format 2025")
    zip_path = out_path.with_suffix(".zip")
    if zip_path == out_path:
        raise RunDirectoryError(f"--out {out_path}: with --zip the submission itself cannot end in .zip")
    return zip_path


def write_predictions(
    outputs: BaseOutputs, vocabulary: ConceptVocabulary, ensemble: FittedEnsemble, out_path: Path, submission_format: str = "2020"
) -> dict:
    """Everything after the networks: kNN, stacking, decisions, the submission and its probabilities file."""
    inputs = to_stacking_inputs(outputs, vocabulary, ensemble.statistics, ensemble.knn)
    probs = sp.csr_matrix(ensemble.stacker.predict_proba(inputs), dtype=np.float32)
    decisions = ensemble.decide(probs, outputs.router_probs)
    predictions = decisions_to_concepts(decisions, outputs.image_ids, vocabulary, probs)
    write_submission(out_path, predictions, format=submission_format)
    probabilities_path = probabilities_path_for(out_path)
    atomic_save_sparse(
        probabilities_path,
        probs,
        image_ids=np.array(outputs.image_ids),
        cuis=np.array(vocabulary.cuis),
        router_probs=outputs.router_probs.astype(np.float32),
        router_categories=np.array(outputs.router_categories),
    )
    counts = np.diff(sp.csr_matrix(decisions).indptr)
    return {
        "submission": str(out_path),
        "probabilities": str(probabilities_path),
        "images": len(outputs.image_ids),
        "decision_rule": ensemble.rule,
        "mean_concepts_per_image": float(counts.mean()) if len(counts) else 0.0,
    }
