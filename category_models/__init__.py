"""Multi-label concept models (global and per modality category)."""

from conceptclef.category_models.model import ConceptModel

__all__ = ["ConceptModel"]
