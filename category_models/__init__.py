"""Multi-label concept models: one per modality category, and the same class over every category.

The design's folder is named for the per-category specialists; the global model (and each extra
global model) is a `ConceptModel` too, trained on all images with the global vocabulary, so one
class serves both and the stacker compares like with like.
"""

from conceptclef.category_models.model import ConceptModel

__all__ = ["ConceptModel"]
