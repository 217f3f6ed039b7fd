"""The modality model of flat data: one sigmoid per modality CUI, the category read from its outputs.

On flat data the categories come from the labels (data.modalities), and those labels are noisy:
a PET image whose caption names the CT of a PET/CT study carries both CUIs, so a softmax router
trained on derived categories learns that some PET images are "combined". A multi-label head
learns each modality CUI on its own, from every image that names any modality, so a PET image
labelled CT a third of the time gets P(CT) about a third, and is routed to PET; a fused PET/CT
image or a two-modality composite gets both and goes to the combined category.

Category probabilities come from the CUI probabilities, taken as independent: a category's
modality is named with q_c = 1 - prod(1 - p_k) over its CUIs; the category alone with
q_c * prod_{d != c}(1 - q_d); the combined category (`several`) with the probability that two
or more are named. They are renormalised over the router's categories (no modality at all is
not a category), so the rest of the pipeline sees the same (N, C) rows as from the softmax router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from conceptclef.router.model import ModalityRouter, accuracy, confusion_matrix
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.inference import Activation
from conceptclef.training.loop import EpochCallback, Objective

HEAD = "modality_cuis"  # the checkpoint's `router_head` for this router (ModalityRouter.load dispatches on it)


def category_probabilities(
    cui_probs: np.ndarray, cuis: Sequence[str], category_cuis: Mapping[str, Sequence[str]], categories: Sequence[str], several: str
) -> np.ndarray:
    """(N, C) probabilities of `categories` from (N, K) independent probabilities of the modality `cuis`.

    Each category of `category_cuis` is named when any of its CUIs is; `several` (when it is one of
    `categories`) holds the probability that two or more are named. Rows sum to 1 over `categories`.
    """
    cui_probs = np.clip(np.asarray(cui_probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    column = {cui: position for position, cui in enumerate(cuis)}
    modality_categories = [category for category in category_cuis if any(cui in column for cui in category_cuis[category])]
    named = np.stack(
        [1.0 - np.prod([1.0 - cui_probs[:, column[cui]] for cui in category_cuis[c] if cui in column], axis=0) for c in modality_categories],
        axis=1,
    ) if modality_categories else np.zeros((len(cui_probs), 0))
    none = np.prod(1.0 - named, axis=1)
    alone = named * (none[:, None] / (1.0 - named))  # q_c * prod_{d != c} (1 - q_d)
    result = np.zeros((len(cui_probs), len(categories)), dtype=np.float64)
    for position, category in enumerate(categories):
        if category in modality_categories:
            result[:, position] = alone[:, modality_categories.index(category)]
        elif category == several:
            result[:, position] = np.clip(1.0 - none - alone.sum(axis=1), 0.0, 1.0)
    total = result.sum(axis=1, keepdims=True)
    uniform = np.full_like(result, 1.0 / max(len(categories), 1))
    return np.where(total > 1e-12, result / np.maximum(total, 1e-12), uniform).astype(np.float32)


def modality_targets(concept_lists: Sequence[Sequence[str]], cuis: Sequence[str]) -> np.ndarray:
    """(N, K) float32 multi-hot rows: which of the modality `cuis` each image lists."""
    column = {cui: position for position, cui in enumerate(cuis)}
    targets = np.zeros((len(concept_lists), len(cuis)), dtype=np.float32)
    for row, listed in enumerate(concept_lists):
        for cui in listed:
            if cui in column:
                targets[row, column[cui]] = 1.0
    return targets


class ModalityCuiRouter(ModalityRouter):
    """A router whose head has one sigmoid per modality CUI (module docstring); `predict_proba`
    gives category probabilities like ModalityRouter's, `predict_cui_proba` the CUIs'."""

    activation: ClassVar[Activation] = "sigmoid"

    def fit_cuis(
        self,
        images: Any,
        concept_lists: Sequence[Sequence[str]],
        valid_images: Any,
        valid_concept_lists: Sequence[Sequence[str]],
        category_cuis: Mapping[str, Sequence[str]],
        categories: Sequence[str],
        several: str,
        work_dir: Path,
        on_epoch_end: EpochCallback | None = None,
    ) -> "ModalityCuiRouter":
        """Train on images listing at least one modality CUI (an image listing none teaches nothing here)."""
        listed = sorted({cui for cuis in category_cuis.values() for cui in cuis})
        targets = modality_targets(concept_lists, listed)
        present = [position for position, cui in enumerate(listed) if targets[:, position].any()]
        if len(present) < 2:
            raise ValueError("modality router: the training images name fewer than two modality CUIs")
        cuis = [listed[position] for position in present]
        targets = targets[:, present]
        valid_targets = modality_targets(valid_concept_lists, cuis)
        if len(targets) != len(images) or len(valid_targets) != len(valid_images):
            raise ValueError("modality router: need exactly one concept list per image (train and valid)")
        self.category_cuis_ = {category: [cui for cui in category_cuis[category] if cui in cuis] for category in category_cuis}
        self.categories_ = [str(category) for category in categories]
        self.several_ = several
        self._fit(images, targets, cuis, valid_images, valid_targets, work_dir, on_epoch_end)
        return self

    def predict_cui_proba(self, images: Any) -> np.ndarray:
        """(N, K) probability of each modality CUI of `cuis_`."""
        return super().predict_proba(images)

    def predict_proba(self, images: Any) -> np.ndarray:
        return self.categories_from(self.predict_cui_proba(images))

    def predict_proba_and_embed(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        probabilities, embeddings = super().predict_proba_and_embed(images)
        return self.categories_from(probabilities), embeddings

    def categories_from(self, cui_probs: np.ndarray) -> np.ndarray:
        """(N, C) category probabilities of `categories_` from (N, K) CUI probabilities."""
        return category_probabilities(cui_probs, self.cuis_, self.category_cuis_, self.categories_, self.several_)

    def _category_indices(self, targets: np.ndarray) -> np.ndarray:
        """Each row's derived category (by the labels, as data.modalities does), -1 for none."""
        named = np.stack([targets[:, [self.cuis_index_[cui] for cui in cuis]].max(axis=1) if cuis else np.zeros(len(targets))
                          for cuis in (self.category_cuis_[c] for c in self._modality_categories())], axis=1)
        count = named.sum(axis=1)
        indices = np.full(len(targets), -1, dtype=np.int64)
        modality_categories = self._modality_categories()
        for row in np.flatnonzero(count == 1):
            indices[row] = self.categories_.index(modality_categories[int(np.argmax(named[row]))])
        if self.several_ in self.categories_:
            indices[count > 1] = self.categories_.index(self.several_)
        return indices

    def _modality_categories(self) -> list[str]:
        return [category for category in self.category_cuis_ if self.category_cuis_[category] and category in self.categories_]

    def _category_accuracy(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        truth = self._category_indices(np.asarray(targets))
        keep = truth >= 0
        if not keep.any():
            return 0.0
        return accuracy(self.categories_from(outputs[keep]), truth[keep])

    def _objective(self, targets: np.ndarray, num_classes: int) -> Objective[np.ndarray]:
        return Objective(nn.BCEWithLogitsLoss(), "sigmoid", "accuracy", self._category_accuracy)

    def _initial_bias(self, targets: np.ndarray, num_classes: int) -> torch.Tensor:
        frequency = np.clip(np.asarray(targets).mean(axis=0), 1e-3, 1 - 1e-3)
        return torch.tensor(np.log(frequency / (1 - frequency)), dtype=torch.float32)

    def _summarize(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        truth = self._category_indices(np.asarray(targets))
        keep = truth >= 0
        probabilities = self.categories_from(outputs[keep])
        return {
            "valid_accuracy": accuracy(probabilities, truth[keep]),
            "confusion": confusion_matrix(probabilities, truth[keep], len(self.categories_)).tolist(),
        }

    def _fit(self, images: Any, targets: Any, classes: list[str], valid_images: Any, valid_targets: Any, work_dir: Path,
             on_epoch_end: EpochCallback | None) -> "ModalityCuiRouter":
        self.cuis_ = list(classes)
        self.cuis_index_ = {cui: position for position, cui in enumerate(classes)}
        super()._fit(images, targets, classes, valid_images, valid_targets, work_dir, on_epoch_end)
        return self

    def _metadata(self, network: Any, classes: list[str]) -> dict[str, Any]:
        return {
            **super()._metadata(network, classes),
            "router_head": HEAD,
            "router_categories": list(self.categories_),
            "category_cuis": {category: list(cuis) for category, cuis in self.category_cuis_.items()},
            "several": self.several_,
        }

    def _restore(self, payload: dict[str, Any], device: torch.device) -> None:
        self.categories_ = [str(category) for category in payload["router_categories"]]
        self.category_cuis_ = {str(category): [str(cui) for cui in cuis] for category, cuis in payload["category_cuis"].items()}
        self.several_ = str(payload["several"])
        self.cuis_ = [str(cui) for cui in payload["classes"]]
        self.cuis_index_ = {cui: position for position, cui in enumerate(self.cuis_)}
        super()._restore(payload, device)

    def _adopt(self, classes: list[str], history: list[dict[str, Any]], best_metric: float, summary: dict[str, Any]) -> None:
        categories = list(self.categories_)
        super()._adopt(classes, history, best_metric, summary)
        self.cuis_ = list(classes)
        self.categories_ = categories  # ModalityRouter._adopt takes the network's classes (here the CUIs) as categories

    @classmethod
    def load(cls, work_dir: Path, device: str = "auto", feature_store: FeatureStore | None = None) -> "ModalityCuiRouter":
        router = super().load(work_dir, device, feature_store)
        assert isinstance(router, ModalityCuiRouter)
        return router
