"""Modality categories derived from concept labels, for data without category folders.

ImageCLEFmedical ships flat image folders since 2021, but every image carries hand-curated
modality CUIs (CT, MRI, ultrasound...), so its category can be read off its labels. The rule:

- the image's CUIs name exactly one category: that category;
- they name several (a PET/CT image): the first of `priority` they name (e.g. DRPE: a PET image
  whose caption names the CT of the PET/CT study), else the combined category `several` (DRCO
  by default, as the 2020 data called it), or, when `several` is "", no category;
- they name none: no category (UNROUTED). Such an image still trains the global model and the
  stacker, but not the router (it would teach it a "no modality" class that is really a
  labelling gap) nor any category model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from conceptclef.core.config import CategoryConfig, ConfigError

UNROUTED = "(none)"  # the derived category of an image without a usable modality CUI
_CUI = re.compile(r"^C\d{7}$")


@dataclass(frozen=True)
class ModalityMapping:
    """CUI -> category, checked once so a typo in the config fails before any image is read."""

    category_of_cui: Mapping[str, str]
    several: str
    priority: tuple[str, ...] = ()  # categories that win when an image names several, first first

    @classmethod
    def from_config(cls, config: CategoryConfig) -> "ModalityMapping":
        category_of_cui: dict[str, str] = {}
        for category, cuis in config.modality_cuis.items():
            if not category or category == UNROUTED or "/" in category or "\\" in category:
                raise ConfigError(f"[categories.modality_cuis]: {category!r} cannot name a category (it becomes a folder name)")
            for cui in cuis:
                cui = cui.strip().upper()
                if not _CUI.match(cui):
                    raise ConfigError(f"[categories.modality_cuis]: {category} = {cui!r} is not a CUI (C and 7 digits)")
                if category_of_cui.get(cui, category) != category:
                    raise ConfigError(f"[categories.modality_cuis]: {cui} is listed under both {category_of_cui[cui]} and {category}")
                category_of_cui[cui] = category
        if config.several in config.modality_cuis or config.several == UNROUTED:
            raise ConfigError(f"[categories] several = {config.several!r} must differ from the modality categories")
        unknown = [category for category in config.priority if category not in config.modality_cuis]
        if unknown:
            raise ConfigError(f"[categories] priority names {', '.join(map(repr, unknown))}, not categories of [categories.modality_cuis]")
        return cls(category_of_cui, config.several, tuple(config.priority))

    def __bool__(self) -> bool:
        return bool(self.category_of_cui)

    def cuis_by_category(self) -> dict[str, list[str]]:
        """category -> its modality CUIs (sorted), the inverse of `category_of_cui`."""
        result: dict[str, list[str]] = {}
        for cui, category in sorted(self.category_of_cui.items()):
            result.setdefault(category, []).append(cui)
        return result

    def names_category(self, cuis: Sequence[str], category: str) -> bool:
        """Whether the CUIs name `category`'s modality (among others or alone)."""
        return any(self.category_of_cui.get(cui) == category for cui in cuis)

    def category_of(self, cuis: Sequence[str]) -> str:
        """The category an image with these CUIs belongs to (UNROUTED when none applies)."""
        named = {self.category_of_cui[cui] for cui in cuis if cui in self.category_of_cui}
        if len(named) == 1:
            return named.pop()
        if len(named) > 1:
            preferred = next((category for category in self.priority if category in named), None)
            if preferred is not None:
                return preferred
        if len(named) > 1 and self.several:
            return self.several
        return UNROUTED


@dataclass(frozen=True)
class DerivedCategories:
    """Each image's derived category, and how many images had none or several modalities."""

    categories: list[str]
    counts: dict[str, int]  # category -> images (UNROUTED included)
    with_several: int  # images naming several categories (whatever `several` made of them)
    with_none: int

    def summary(self) -> str:
        named = ", ".join(f"{category} {count}" for category, count in sorted(self.counts.items()) if category != UNROUTED)
        left_out = self.counts.get(UNROUTED, 0)
        return (
            f"{named or 'none'}; {self.with_several} with several modalities, {self.with_none} with none; "
            f"{left_out} left out of router and category training"
        )


def derive_categories(concept_lists: Sequence[Sequence[str]], mapping: ModalityMapping) -> DerivedCategories:
    categories = [mapping.category_of(cuis) for cuis in concept_lists]
    named = [len({mapping.category_of_cui[cui] for cui in cuis if cui in mapping.category_of_cui}) for cuis in concept_lists]
    return DerivedCategories(
        categories=categories,
        counts=dict(Counter(categories)),
        with_several=sum(count > 1 for count in named),
        with_none=sum(count == 0 for count in named),
    )
