"""Every path of a run directory, in one place.

The names on disk are those runs have always used (tests and existing runs rely on them): a
command asks `RunLayout` for a path instead of spelling a file name. Inside a network's work
folder, `NetworkFiles` names the pipeline's files; the estimator's own (checkpoint.pt, resume.pt,
state.json, metrics.csv, curves.png, head-warmup/) are `training.checkpoints.RunFiles`'s, and the
fitted ensemble's own in RUN/ensemble/ (stacker.txt, stacker.json, decision.json,
thresholds.json, expected_f1.json) are written by the estimators of `ensemble`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BACKBONE_PREFIX", "NetworkFiles", "RunLayout"]


@dataclass(frozen=True)
class NetworkFiles:
    """The files the pipeline keeps in one network's work folder.

    The estimator's own files there (checkpoint.pt, resume.pt, state.json, metrics.csv,
    curves.png, head-warmup/) are named by `training.checkpoints.RunFiles`.
    """

    folder: Path

    @property
    def vocabulary(self) -> Path:
        return self.folder / "vocabulary.json"

    @property
    def validation_predictions(self) -> Path:
        """Probabilities (and, for the global model, embeddings) on every validation image."""
        return self.folder / "valid_predictions.npz"

    @property
    def train_embeddings(self) -> Path:
        """The global model's embeddings of the training images: the kNN index."""
        return self.folder / "train_embeddings.npz"

    @property
    def knn_index(self) -> Path:
        """The final-fit global model's kNN index: its embeddings of train + valid and their labels."""
        return self.folder / "knn_index.npz"

    @property
    def replay_record(self) -> Path:
        """A final-fit network's step budget and the split-run network it replays (job fingerprint, best epoch)."""
        return self.folder / "replay.json"

    @property
    def baseline(self) -> Path:
        return self.folder / "baseline.json"

    @property
    def confusion(self) -> Path:
        return self.folder / "confusion.json"

    @property
    def init_record(self) -> Path:
        """Which global checkpoint a specialist started from (category_model.init_from = "global")."""
        return self.folder / "init.json"

    @property
    def fallback_record(self) -> Path:
        """Why a category has no model of its own and uses the global model."""
        return self.folder / "fallback.json"

    @property
    def settings_record(self) -> Path:
        """The settings it was trained with (train-all retrains it when RUN/config.toml changes them)."""
        return self.folder / "settings.json"

    def exported_backbone(self, digest: str) -> Path:
        """The global model's backbone, named by its checkpoint's hash, that specialists start from."""
        return self.folder / f"{BACKBONE_PREFIX}{digest[:16]}.pth"


BACKBONE_PREFIX = "backbone-"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory; the on-disk names live here and nowhere else.

    A fold's or the final fit's layout (`fold`, `final_fit`) has its own `root` for its networks
    and keeps the run's (`run_root`) for what the run holds once (categories.json).
    """

    root: Path
    run_root: Path | None = None  # the run directory, when `root` is a fold's or the final fit's folder

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock_path(self) -> Path:
        """Empty; flock held by the running train-all (pipeline.run.lock)."""
        return self.root / ".lock"

    @property
    def fingerprint_path(self) -> Path:
        """The data the run was trained on (pipeline.run.fingerprint)."""
        return self.root / "data.json"

    @property
    def category_record_path(self) -> Path:
        """Where the categories came from and images per category (pipeline.run.category_record)."""
        return (self.run_root or self.root) / "categories.json"

    @property
    def router_dir(self) -> Path:
        return self.root / "router"

    @property
    def global_dir(self) -> Path:
        return self.root / "global"

    def extra_global_dir(self, name: str) -> Path:
        return self.root / f"global-{name}"

    def category_dir(self, category: str) -> Path:
        return self.root / f"category-{category}"

    @staticmethod
    def files(work_dir: Path) -> NetworkFiles:
        """The pipeline's files in a network's work folder."""
        return NetworkFiles(work_dir)

    def fallback_path(self, category: str) -> Path:
        return self.files(self.category_dir(category)).fallback_record

    def fold(self, fold: int) -> "RunLayout":
        """The layout of one fold's networks (`[development] scheme = "cross_fit"`): RUN/folds/fold-<k>/,
        holding router/, global/, ... and ensemble/knn_index.npz (the fold global model's index)."""
        return RunLayout(self.root / "folds" / f"fold-{fold}", self.run_root or self.root)

    @property
    def final_fit(self) -> "RunLayout":
        """The layout of the final-fit networks (`[development] scheme = "final_fit"`): RUN/final-fit/,
        holding router/, global/ (with knn_index.npz), global-<NAME>/, category-<NAME>/, each the
        split-run network of the same relative folder trained again on train + valid."""
        return RunLayout(self.root / "final-fit", self.run_root or self.root)

    @property
    def out_of_fold_dir(self) -> Path:
        """Every fold network's predictions on its held-out fold, gathered per network kind in the
        development images' order (float16): RUN/out-of-fold/<network>/valid_predictions.npz."""
        return self.root / "out-of-fold"

    @property
    def out_of_fold_knn_path(self) -> Path:
        """The out-of-fold kNN scores of the development images (each from its fold's index)."""
        return self.out_of_fold_dir / "knn_scores.npz"

    @property
    def ensemble_dir(self) -> Path:
        return self.root / "ensemble"

    @property
    def concept_statistics_path(self) -> Path:
        return self.ensemble_dir / "concept_statistics.npz"

    @property
    def knn_index_path(self) -> Path:
        return self.ensemble_dir / "knn_index.npz"

    @property
    def out_of_fold_path(self) -> Path:
        """The stacker's out-of-fold probabilities on the validation images."""
        return self.ensemble_dir / "oof_predictions.npz"

    @property
    def ensemble_record_path(self) -> Path:
        return self.ensemble_dir / "ensemble.json"

    @property
    def validation_truth_path(self) -> Path:
        return self.ensemble_dir / "valid_truth.npz"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"
