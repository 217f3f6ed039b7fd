"""Multi-label concept models: the global model, the extra global models and one per modality category."""

from conceptclef.concept_models.model import ConceptModel

__all__ = ["ConceptModel"]
