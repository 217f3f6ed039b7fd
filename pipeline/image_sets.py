"""Turn a dataset folder into what the models eat: cached uint8 image arrays and label matrices."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from conceptclef.core.config import Config
from conceptclef.data.cache import ImageCache
from conceptclef.data.errors import DataError, ImageReadError
from conceptclef.data.layout import ImageRecord, LabelledSplit, list_image_folder, load_split
from conceptclef.data.modalities import UNROUTED, ModalityMapping, derive_categories
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.devices.ranks import main_process_first

log = logging.getLogger("conceptclef")


class SubsetImages:
    """Rows of a (memory-mapped) image array, without copying them into memory.

    Per-category models train on a subset of the cached training array; at full scale a copy
    would cost gigabytes, so batches are gathered from the parent array on demand.
    """

    def __init__(self, parent: np.ndarray, indices: np.ndarray) -> None:
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.parent.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parent.dtype

    @property
    def ndim(self) -> int:
        return self.parent.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = self.indices[key]
        if np.ndim(rows) == 0:
            return self.parent[int(rows)]
        order = np.argsort(rows, kind="stable")  # memmaps read fastest in file order
        gathered = self.parent[rows[order]]
        result = np.empty_like(gathered)
        result[order] = gathered
        return result

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        array = self[np.arange(len(self))]
        return array.astype(dtype) if dtype is not None else array


class ConcatenatedImages:
    """Several image arrays one after the other (train's rows, then valid's), without copying them.

    The final fit trains on train + valid: as two parts (not one new cache of both), the
    frozen-backbone feature store finds the features it computed for each split before
    (`training.image_identity.ConcatenatedRows`).
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(part) for part in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def ndim(self) -> int:
        return self.parts[0].ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.arange(len(self))[key]
        if np.ndim(rows) == 0:
            part = int(np.searchsorted(self.offsets, rows, side="right")) - 1
            return self.parts[part][int(rows - self.offsets[part])]
        rows = np.asarray(rows, dtype=np.int64)
        result = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part_of_row = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(part_of_row):
            chosen = np.flatnonzero(part_of_row == part)
            result[chosen] = self.parts[part][rows[chosen] - self.offsets[part]]
        return result

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        array = self[np.arange(len(self))]
        return array.astype(dtype) if dtype is not None else array

    def subset(self, indices: np.ndarray) -> "ConcatenatedImages | SubsetImages":
        """Rows `indices`: per part when they keep the parts' order (a category's members), so each
        part's features are still found; a plain row subset otherwise."""
        indices = np.asarray(indices, dtype=np.int64)
        part_of_row = np.searchsorted(self.offsets, indices, side="right") - 1
        if np.any(np.diff(part_of_row) < 0):
            return SubsetImages(self, indices)  # type: ignore[arg-type]
        return ConcatenatedImages(
            [SubsetImages(part, indices[part_of_row == position] - self.offsets[position]) for position, part in enumerate(self.parts)]
        )


def _image_rows(images: Any, indices: np.ndarray) -> Any:
    """Rows of a cached image array (or of train + valid's two) as a view, without copying pixels."""
    return images.subset(indices) if isinstance(images, ConcatenatedImages) else SubsetImages(images, indices)


def concatenated(first: "ImageSet", second: "ImageSet") -> "ImageSet":
    """`first`'s images, then `second`'s, as one labelled set over the same cached arrays."""
    concepts = None if first.concept_lists is None or second.concept_lists is None else first.concept_lists + second.concept_lists
    return ImageSet(list(first.records) + list(second.records), ConcatenatedImages([first.images, second.images]), concepts)  # type: ignore[arg-type]


@dataclass
class ImageSet:
    """One split's usable images: records, their cached pixels, and (when labelled) concepts."""

    records: list[ImageRecord]
    images: np.ndarray  # uint8 (N, S, S, 3), memory-mapped
    concept_lists: list[list[str]] | None = None

    @property
    def image_ids(self) -> list[str]:
        return [record.image_id for record in self.records]

    @property
    def categories(self) -> list[str | None]:
        return [record.category for record in self.records]

    def subset(self, indices: np.ndarray) -> "ImageSet":
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            records=[self.records[i] for i in indices],
            images=_image_rows(self.images, indices),
            concept_lists=None if self.concept_lists is None else [self.concept_lists[i] for i in indices],
        )

    @property
    def known_concepts(self) -> list[list[str]]:
        """The concept lists of a labelled set (train, valid); an unlabelled set has none to give."""
        if self.concept_lists is None:
            raise ValueError("this image set has no concepts")
        return self.concept_lists

    def labels(self, vocabulary: ConceptVocabulary) -> sp.csr_matrix:
        return vocabulary.encode(self.known_concepts)


def cached_images(records: list[ImageRecord], config: Config, cache_dir: Path, keep_bad: bool) -> tuple[list[ImageRecord], np.ndarray, list[int]]:
    """Decode (once) and cache the records' images; bad ones are dropped unless keep_bad.

    Training can drop an unreadable image, but a test image must still get a prediction, so
    predict keeps it (as a blank image) when the user asked to skip bad images.
    """
    cache = ImageCache(cache_dir)
    with main_process_first():
        cached = cache.image_array([record.path for record in records], config.data.image_size, skip_bad=config.data.skip_bad_images)
    bad = sorted(cached.bad_indices)
    if not bad or keep_bad:
        return records, cached.array, bad
    good = np.setdiff1d(np.arange(len(records)), bad)
    return [records[i] for i in good], SubsetImages(cached.array, good), bad  # type: ignore[return-value]


def load_labelled_set(split: LabelledSplit, config: Config, cache_dir: Path) -> ImageSet:
    try:
        records, images, bad = cached_images(list(split.records), config, cache_dir, keep_bad=False)
    except ImageReadError as error:
        raise _cite_concept_row(error, split) from None
    if bad:
        log.warning(
            "%s: skipped %d of %d unreadable images (data.skip_bad_images = true): %s",
            split.name, len(bad), len(split.records), _first_paths(split.records, bad),
        )
    concepts = [split.concepts[record.image_id] for record in records]
    return ImageSet(records=records, images=images, concept_lists=concepts)


UNCATEGORISED = "ALL"  # the one category of flat data whose labels name no modality (or with derivation off)


def load_training_sets(data_dir: Path, config: Config, cache_dir: Path | None = None, announce: bool = True) -> tuple[ImageSet, ImageSet]:
    """The train and valid image sets; without a valid split, a stratified slice of train.

    Images straight in train/ and valid/ (no category sub-folders, as ImageCLEF 2021-2026 ship
    them) get their category from their modality CUIs (data.modalities, [categories] in the
    config); a split mixing both layouts is refused. Both concept files are read and every
    category assigned before any image is decoded, so a bad row fails in seconds, not after caching.
    `cache_dir` overrides where the image cache goes (train-all: see pipeline.run.directory.image_cache_dir).
    `announce` logs the derived categories; off when the same data are read again at another image size.
    """
    data_dir = Path(data_dir)
    if cache_dir is None:
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else data_dir / ".cache"
    has_valid = (data_dir / "valid").is_dir()
    splits = assign_categories([load_split(data_dir, "train"), *([load_split(data_dir, "valid")] if has_valid else [])], config, announce)
    image_sets = [load_labelled_set(split, config, cache_dir) for split in splits]
    if has_valid:
        return image_sets[0], image_sets[1]
    train = image_sets[0]
    log.info("%s has no valid/ split: holding out %.0f%% of train", data_dir, 100 * config.data.validation_fraction)
    rng = np.random.default_rng(config.seed)
    held_out: list[int] = []
    categories = np.array([str(category) for category in train.categories])
    for category in np.unique(categories):
        members = np.flatnonzero(categories == category)
        count = max(1, int(round(len(members) * config.data.validation_fraction)))
        held_out.extend(rng.choice(members, size=min(count, len(members) - 1), replace=False).tolist())
    held = np.array(sorted(held_out), dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(train.records)), held)
    return train.subset(kept), train.subset(held)


def assign_categories(splits: list[LabelledSplit], config: Config, announce: bool = True) -> list[LabelledSplit]:
    """Folder categories as they are; flat splits get categories derived from their labels.

    When no training image names a modality of the mapping (or the mapping is empty), flat data
    stays one category, UNCATEGORISED, as before. A validation image of a category no training
    image has cannot be routed there, so it is left out of routing (UNROUTED) like one with none.
    """
    records = [record for split in splits for record in split.records]
    flat = [record for record in records if record.category is None]
    if not flat:
        return splits
    if len(flat) < len(records):
        raise DataError(
            flat[0].path,
            "this image lies directly in its split folder while others are in category sub-folders; "
            "use one layout for train/ and valid/",
        )
    mapping = ModalityMapping.from_config(config.categories)
    derived = [derive_categories(split.concept_lists, mapping) for split in splits]
    trained = set(derived[0].categories) - {UNROUTED}
    if not trained:
        why = "[categories] maps no CUI" if not mapping else "no training image has a modality CUI of [categories]"
        log.info("flat train/ and valid/ folders, %s: one category, %s", why, UNCATEGORISED)
        return [_with_categories(split, [UNCATEGORISED] * len(split)) for split in splits]
    if announce:
        _warn_unused_modality_cuis(mapping, splits[0])
    result = []
    for split, found in zip(splits, derived):
        if announce:
            log.info("%s: categories from modality CUIs: %s", split.name, found.summary())
        unseen = sorted(set(found.categories) - trained - {UNROUTED})
        if unseen and announce:
            log.warning("%s: categories %s have no training image; their images are left out of routing", split.name, ", ".join(unseen))
        result.append(_with_categories(split, [category if category in trained else UNROUTED for category in found.categories]))
    return result


def _warn_unused_modality_cuis(mapping: ModalityMapping, train: LabelledSplit) -> None:
    """A [categories] CUI no training image carries routes nothing: usually a typo or another
    edition's code, and its category silently loses those images."""
    carried = {cui for concepts in train.concept_lists for cui in concepts}
    for cui, category in sorted(mapping.category_of_cui.items(), key=lambda item: (item[1], item[0])):
        if cui not in carried:
            log.warning(
                "[categories.modality_cuis] %s: %s is on no training image, so it derives no %s image (a typo, or another edition's CUI?)",
                category, cui, category,
            )


def _with_categories(split: LabelledSplit, categories: list[str]) -> LabelledSplit:
    records = tuple(dataclasses.replace(record, category=category) for record, category in zip(split.records, categories))
    return dataclasses.replace(split, records=records)


def routed_subset(image_set: ImageSet) -> ImageSet:
    """The images the router learns from: all but those without a derived category."""
    keep = np.flatnonzero(np.array([category != UNROUTED for category in image_set.categories], dtype=bool))
    return image_set if len(keep) == len(image_set.records) else image_set.subset(keep)


def routable_categories(image_set: ImageSet) -> list[str]:
    """The run's categories: what the router chooses between, each with a model (or a fallback)."""
    return sorted({str(category) for category in image_set.categories} - {UNROUTED})


def load_unlabelled_set(images_dir: Path, config: Config, cache_dir: Path) -> tuple[ImageSet, list[int]]:
    """A folder of test images, every one kept so the submission covers them all."""
    records = list_image_folder(Path(images_dir))
    records, images, bad = cached_images(records, config, cache_dir, keep_bad=True)
    if bad:
        log.warning(
            "%s: %d of %d unreadable images get predictions from a blank image (data.skip_bad_images = true): %s",
            images_dir, len(bad), len(records), _first_paths(records, bad),
        )
    return ImageSet(records=records, images=images), bad


def _first_paths(records: Sequence[ImageRecord], indices: list[int], shown: int = 5) -> str:
    names = ", ".join(str(records[index].path) for index in indices[:shown])
    return names + (", ..." if len(indices) > shown else "")


def _cite_concept_row(error: ImageReadError, split: LabelledSplit) -> ImageReadError:
    """The same error, also naming the concept-file line that listed the image: the user fixes one or the other."""
    image_id = next((record.image_id for record in split.records if record.path == error.path), None)
    line = split.lines.get(image_id) if image_id is not None else None
    if split.source is None or line is None:
        return error
    return ImageReadError(error.path, f"{error.message} (image {image_id!r}, listed at {split.source}:{line})")


def config_at_image_size(config: Config, image_size: int) -> Config:
    """The run's config with another image size: how a network at its own image size (an extra
    global model) has its images cached and read."""
    return config.replace(data=dataclasses.replace(config.data, image_size=image_size))


def same_images(reference: ImageSet, other: ImageSet, where: Path | str) -> ImageSet:
    """`other` (the same images at another size), refused when its images are not `reference`'s."""
    if other.image_ids != reference.image_ids:
        raise RunDirectoryError(f"{where}: the images read at another size differ from the run's; were files added or removed meanwhile?")
    return other


ImagesAtSize = Callable[[int], ImageSet]  # image size -> the same images read at that size
