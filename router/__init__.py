"""The modality router (softmax CNN over the modality categories; a trivial one for a single category)."""

from conceptclef.router.model import ModalityRouter
from conceptclef.router.single import SingleCategoryRouter, router_class_for

__all__ = ["ModalityRouter", "SingleCategoryRouter", "router_class_for"]
