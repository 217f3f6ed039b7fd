"""RUN/categories.json: where a run's categories came from, and how many images each had.

On flat data the categories are derived from the labels, so the run records that, with the
counts (images with no modality CUI included), for two readers: the user checking what the
router was trained on, and `ablation`, which derives the test images' true categories from
their ground truth the same way only when the run itself did.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.data.layout import discover_categories
from conceptclef.pipeline.image_sets import UNCATEGORISED, ImageSet
from conceptclef.pipeline.devices.ranks import is_main_process
from conceptclef.pipeline.run.layout import RunLayout

FROM_FOLDERS, FROM_LABELS, ONE_CATEGORY = "folders", "modality CUIs", "one category"


def write_category_record(layout: RunLayout, data_dir: Path, train: ImageSet, valid: ImageSet) -> dict:
    categories = {str(category) for category in train.categories}
    source = FROM_FOLDERS if discover_categories(data_dir) else ONE_CATEGORY if categories == {UNCATEGORISED} else FROM_LABELS
    record = {
        "source": source,
        "images": {
            name: dict(sorted(Counter(str(category) for category in image_set.categories).items()))
            for name, image_set in (("train", train), ("valid", valid))
        },
    }
    path = layout.category_record_path
    if is_main_process() and not (path.is_file() and read_json(path) == record):
        atomic_write_json(path, record)
    return record


def categories_from_labels(layout: RunLayout) -> bool:
    """Whether the run derived its categories from modality CUIs (runs before this file: no)."""
    path = layout.category_record_path
    return path.is_file() and read_json(path).get("source") == FROM_LABELS
