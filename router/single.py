"""The router of a dataset with a single category, or none (a flat train/ folder, as the ImageCLEF
2021-2025 data comes): every image goes to that category with probability 1.

There is nothing to learn, so nothing is trained: a softmax over one class would still cost the
router's full epochs on a GPU config. It offers the ModalityRouter interface the pipeline uses
(`fit`, `predict_proba`, `load`, `is_trained`, `categories_`, `valid_accuracy_`, `confusion_`)
and keeps its one fact in a JSON file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.router.model import ModalityRouter
from conceptclef.training.distributed import is_main_process

MARKER_FILE = "single_category.json"


class SingleCategoryRouter:
    """Routes every image to the only category (sklearn-style: fit / predict_proba / load)."""

    def fit(self, categories: Sequence[str], valid_categories: Sequence[str], work_dir: Path) -> "SingleCategoryRouter":
        names = sorted({str(category) for category in categories})
        if len(names) != 1:
            raise ValueError(f"single-category router: the training data has {len(names)} categories ({', '.join(names)})")
        unknown = sorted({str(category) for category in valid_categories} - set(names))
        if unknown:
            raise ValueError(f"router: validation categories never seen in training: {', '.join(unknown)}")
        if is_main_process():  # under torchrun every rank calls fit; one writes
            Path(work_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(work_dir) / MARKER_FILE, {"category": names[0]})
        return self._adopt(names[0], len(valid_categories))

    def _adopt(self, category: str, n_valid: int = 0) -> "SingleCategoryRouter":
        self.categories_ = [category]
        self.valid_accuracy_ = 1.0
        self.confusion_ = np.array([[n_valid]], dtype=np.int64)
        return self

    def predict_proba(self, images: Any) -> np.ndarray:
        return np.ones((len(images), 1), dtype=np.float32)

    def predict(self, images: Any) -> list[str]:
        return [self.categories_[0]] * len(images)

    @classmethod
    def load(cls, work_dir: Path, device: str = "auto", feature_store: Any = None) -> "SingleCategoryRouter":
        return cls()._adopt(str(read_json(Path(work_dir) / MARKER_FILE)["category"]))

    @staticmethod
    def is_trained(work_dir: Path) -> bool:
        path = Path(work_dir) / MARKER_FILE
        try:
            return path.is_file() and isinstance(read_json(path).get("category"), str)
        except (ValueError, OSError, AttributeError):
            return False


def router_class_for(categories: Sequence[str]) -> type:
    """The router a run with these categories uses: a trained CNN only when there is a choice to make."""
    return SingleCategoryRouter if len(categories) == 1 else ModalityRouter
