"""Multi-label concept models (global and per modality category)."""

from category_models.model import ConceptModel

__all__ = ["ConceptModel"]
