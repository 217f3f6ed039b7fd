"""The modality router (softmax CNN over the modality categories)."""

from router.model import ModalityRouter

__all__ = ["ModalityRouter"]
