"""The final fit: every network of the run trained again on train + valid, for test.

With `[development] scheme = "final_fit"` train-all first runs the split scheme unchanged (the
networks learn from train and early-stop on valid; the stacker and decision rule are cross-fitted
on their valid outputs). Then each network of the run's table is trained again, in
RUN/final-fit/<its folder>/, on train + valid for a fixed number of optimizer steps: the steps its
split-run network had taken at its best (restored) round, with that run's learning rates and
unfreezing replayed step by step (`training.replay`). Nothing is held out, so nothing stops it
early and it predicts nothing for the stacker.

At test time (`FinalFitModels`) the final-fit networks give the probabilities, the final-fit
global model's embeddings query its own kNN index over train + valid (RUN/final-fit/global/
knn_index.npz: its embedding space is not the split-run model's), and the split run's stacker and
decision rule (fitted on out-of-sample valid outputs) turn them into label sets.

A final-fit network is out of date when its split-run network has another job fingerprint or best
epoch than the one its budget came from (RUN/final-fit/<folder>/replay.json); train-all retrains it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import Config
from conceptclef.core.runfiles import atomic_write_json
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.knn import NearestNeighbourScorer
from conceptclef.pipeline.devices.ranks import is_main_process
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.image_sets import ImagesAtSize, ImageSet
from conceptclef.pipeline.run.directory import Manifest
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.run.networks import Network, Role, split_run_identity
from conceptclef.pipeline.stages.predict import RunModels
from conceptclef.pipeline.stages.stacking import BaseOutputs, load_knn_scorer, save_knn_index
from conceptclef.router import ModalityRouter, SingleCategoryRouter
from conceptclef.training.checkpoints import RunFiles
from conceptclef.training.loop import HEAD_WARMUP_FOLDER, head_warmup_config
from conceptclef.training.replay import ReplayError, StepReplay

log = logging.getLogger("conceptclef")

__all__ = ["FinalFitModels", "final_fitted", "record_final_fit", "step_replay"]


def final_fitted(config: Config) -> bool:
    return config.development.scheme == "final_fit"


def step_replay(network: Network, layout: RunLayout) -> StepReplay | None:
    """The budget of a final-fit network from its split-run network's finished run (None: the
    one-category router, which trains nothing); with a head warm-up, the warm-up's budget too."""
    split = network.split_network(layout)
    state = RunFiles(split.work_dir).read_state()
    if state is None:
        return None
    try:
        replay = StepReplay.from_state(state, split.settings)
        if split.settings.finetune != "head" and split.settings.head_warmup_epochs > 0:
            warmup_state = RunFiles(split.work_dir / HEAD_WARMUP_FOLDER).read_state() or {}
            replay = dataclasses.replace(replay, warmup=StepReplay.from_state(warmup_state, head_warmup_config(split.settings)))
    except ReplayError as error:
        raise RunDirectoryError(f"{split.work_dir}: {split.description} gives no step budget for the final fit: {error}") from error
    log.info("%s: %d optimizer steps on train + valid (the split run's at its best round)", network.job_name, replay.steps)
    return replay


def record_final_fit(
    network: Network,
    layout: RunLayout,
    replay: StepReplay | None,
    model: ConceptModel | ModalityRouter | SingleCategoryRouter,
    index: ImageSet,
    vocabulary: ConceptVocabulary | None,
) -> None:
    """After a final-fit network trained: the global model's kNN index over train + valid, and the
    record of the split-run network its budget came from (what `Network.outdated_reason` checks)."""
    if network.role is Role.GLOBAL:
        assert vocabulary is not None and isinstance(model, ConceptModel)
        log.info("%s: embedding the %d train + valid images (the test kNN index)", network.job_name, len(index.records))
        embeddings = model.embed(index.images)
        if is_main_process():
            save_knn_index(network.files.knn_index, embeddings, index.labels(vocabulary))
    if is_main_process():
        split_dir = network.split_network(layout).work_dir
        atomic_write_json(
            network.files.replay_record,
            {"split_run": split_run_identity(split_dir), "steps": replay.steps if replay is not None else 0},
        )


@dataclass
class FinalFitModels:
    """The final-fit networks of a run and their kNN index; `predict` gives their test outputs."""

    models: RunModels
    knn: NearestNeighbourScorer

    @classmethod
    def load(cls, layout: RunLayout, manifest: Manifest, config: Config) -> "FinalFitModels":
        models = RunModels.load(layout, manifest, config, final_fit=True)
        path = layout.files(layout.final_fit.global_dir).knn_index
        if not path.is_file():
            raise RunDirectoryError(f"{path}: missing; rerun train-all to finish the final fit")
        return cls(models, load_knn_scorer(path, config.ensemble.knn_neighbours))

    @property
    def vocabulary(self) -> ConceptVocabulary:
        return self.models.vocabulary

    @property
    def category_models(self) -> dict:
        return self.models.category_models

    @property
    def extra_global_models(self) -> dict:
        return self.models.extra_global_models

    def predict(self, image_set: ImageSet, images_at_size: ImagesAtSize | None = None) -> BaseOutputs:
        """The final-fit networks' outputs, with kNN scores from their own index over train + valid."""
        outputs = self.models.predict(image_set, images_at_size)
        outputs.knn_scores = sp.csr_matrix(self.knn.predict(outputs.global_embeddings), dtype=np.float32)
        return outputs
