"""A small synthetic dataset in the ImageCLEF 2020 layout, on which the whole pipeline can run in minutes.

Generative story, per image (all draws from one numpy Generator seeded by `seed`):

1. Modality category, with the imbalance of the real 2020 data: DRCT 30%, DRXR 25%, DRMR 15%,
   DRUS 12%, DRAN 8%, DRCO 5%, DRPE 5%. Its UMLS modality concept (e.g. C0040405 CT; both PET and
   CT for the combined DRCO, PET/CT) is listed on every image, as ROCOv2's hand-curated modality
   labels are, so flat data can derive the category from the labels (data.modalities).
2. Body region, from a modality-specific distribution (XR is mostly chest and limbs, US mostly
   abdomen, MR mostly head...). The region concept is listed on 85% of images and an organ concept
   (brain, lung, heart, liver, knee...) on 60%; both look different in each modality.
3. Findings, each with a modality- (and sometimes region-) specific probability, drawn in the
   image: mass (bright blob / PET hot spot), cyst (dark round), calcification (bright dots),
   fracture (a line through bone), pleural effusion (fluid in the lung base), contrast, stenosis
   and stent (angiography only), colour Doppler (ultrasound only).
4. Caption-only concepts that are invisible (patients, biopsy, metastasis, follow-up...), whose
   frequency depends on the modality, so only modality-aware models can predict them well.
5. A long tail: with probability 0.45 one rare CUI from a pool split by modality; each is used a
   few times over the dataset. These synthetic CUIs start with C9 (real CUIs stay below C6).

Visual styles per modality are described in data.demo_render. Routing therefore matters: the
same finding looks different per modality, and most concepts are specific to one or two.

Realistic labels (`DemoShares`, the default of the flat layouts): ROCOv2's concept lists hold
what was extracted from captions beside the hand-curated modality, so deriving categories from
labels meets three things the plain story lacks:

- fused PET/CT: a share of the PET images (category DRPE, rendered as PET) also lists CT;
- no modality: a share of all images lists no modality CUI (combined modalities, nothing named);
- composite figures: a share of the images shows two panels of two modalities (category DRCO,
  as the 2020 data filed multi-panel figures) and lists both panels' concepts.

These draws come from a second generator (seeded by `seed` too), so with every share at 0 the
images and labels are byte for byte those of the plain story, and any layout given the same
shares holds the same images.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from conceptclef.core.runfiles import atomic_write_json, atomic_write_text, read_json
from conceptclef.data.demo_render import render_image
from conceptclef.data.errors import DataError


@dataclass(frozen=True)
class DemoModality:
    cuis: tuple[str, ...]  # the modality concepts every image of this category carries
    name: str
    frequency: float
    regions: dict[str, float]
    findings: dict[str, float]
    captions: dict[str, float]  # invisible concepts (by key of CAPTION_CUIS) -> probability


REGION_CUIS = {"head": "C0018670", "chest": "C0817096", "abdomen": "C0000726", "limb": "C0023216"}
ORGAN_CUIS = {
    "brain": "C0006104", "lung": "C0024109", "heart": "C0018787", "liver": "C0023884",
    "kidney": "C0022646", "knee": "C0022742", "femur": "C0015811", "spine": "C0037949",
}
# Organs a region's caption may name; ultrasound and angiography of the chest show the heart.
REGION_ORGANS = {"head": ("brain",), "chest": ("lung", "heart", "spine"), "abdomen": ("liver", "kidney", "spine"),
                 "limb": ("knee", "femur")}
FINDING_CUIS = {
    "mass": "C0577559",  # Mass of body structure
    "cyst": "C0010709",  # Cyst
    "calcification": "C0006660",  # Calcinosis
    "fracture": "C0016658",  # Fracture
    "effusion": "C0032227",  # Pleural effusion
    "contrast": "C0009924",  # Contrast Media
    "stenosis": "C1261287",  # Stenosis
    "stent": "C0038257",  # Stent
    "doppler": "C0554756",  # colour Doppler ultrasonography (CUI as recalled, not checked offline)
}
CAPTION_CUIS = {
    "patients": "C0030705", "diagnosis": "C0011900", "biopsy": "C0005558", "metastasis": "C0027627",
    "postoperative": "C0032790", "hemorrhage": "C0019080", "neoplasm": "C0027651", "edema": "C0013604",
    "aneurysm": "C0002940", "follow_up": "C1522577",
}
_COMMON_CAPTIONS = {"patients": 0.25, "diagnosis": 0.2}

MODALITIES: dict[str, DemoModality] = {
    "DRCT": DemoModality(("C0040405",), "X-Ray Computed Tomography", 0.30,
                         {"head": 0.25, "chest": 0.35, "abdomen": 0.35, "limb": 0.05},
                         {"mass": 0.25, "cyst": 0.12, "calcification": 0.12, "fracture": 0.05, "effusion": 0.15,
                          "contrast": 0.2},
                         {**_COMMON_CAPTIONS, "metastasis": 0.12, "hemorrhage": 0.15, "neoplasm": 0.1, "biopsy": 0.1}),
    "DRXR": DemoModality(("C1306645",), "Plain x-ray", 0.25,
                         {"chest": 0.5, "limb": 0.3, "abdomen": 0.15, "head": 0.05},
                         {"mass": 0.1, "calcification": 0.12, "fracture": 0.25, "effusion": 0.2},
                         {**_COMMON_CAPTIONS, "postoperative": 0.25, "follow_up": 0.3}),
    "DRMR": DemoModality(("C0024485",), "Magnetic Resonance Imaging", 0.15,
                         {"head": 0.5, "limb": 0.25, "abdomen": 0.15, "chest": 0.1},
                         {"mass": 0.25, "cyst": 0.15},
                         {**_COMMON_CAPTIONS, "edema": 0.3, "hemorrhage": 0.15, "neoplasm": 0.25}),
    "DRUS": DemoModality(("C0041618",), "Ultrasonography", 0.12,
                         {"abdomen": 0.7, "chest": 0.15, "limb": 0.15},
                         {"mass": 0.2, "cyst": 0.25, "doppler": 0.35},
                         {**_COMMON_CAPTIONS, "biopsy": 0.35}),
    "DRAN": DemoModality(("C0002978",), "Angiogram", 0.08,
                         {"head": 0.4, "chest": 0.35, "abdomen": 0.25},
                         {"contrast": 0.6, "stenosis": 0.3, "stent": 0.3},
                         {**_COMMON_CAPTIONS, "aneurysm": 0.35, "postoperative": 0.15}),
    "DRCO": DemoModality(("C0032743", "C0040405"), "PET/CT scan", 0.05,
                         {"chest": 0.5, "abdomen": 0.5},
                         {"mass": 0.5, "effusion": 0.1},
                         {**_COMMON_CAPTIONS, "metastasis": 0.45, "neoplasm": 0.3}),
    "DRPE": DemoModality(("C0032743",), "Positron-Emission Tomography", 0.05,
                         {"head": 0.2, "chest": 0.4, "abdomen": 0.4},
                         {"mass": 0.5},
                         {**_COMMON_CAPTIONS, "metastasis": 0.45, "neoplasm": 0.3}),
}
CATEGORIES = tuple(MODALITIES)
_FINDINGS_BY_REGION = {"effusion": {"chest"}, "fracture": {"limb", "chest", "head"}}
_RARE_PROBABILITY = 0.45
DEMO_MARKER = "demo.json"


@dataclass(frozen=True)
class DemoPanel:
    """The second panel of a composite figure: its own modality, region and findings."""

    category: str
    region: str
    findings: frozenset[str]


@dataclass(frozen=True)
class DemoImage:
    image_id: str
    category: str
    region: str
    findings: frozenset[str]
    cuis: tuple[str, ...]
    panel: DemoPanel | None = None  # composite figure: the right-hand panel (the left one is category/region/findings)
    panel_category: str | None = None  # composite figure: the left panel's modality (category is then DRCO)


@dataclass(frozen=True)
class DemoShares:
    """How realistic the labels are (see the module docstring); every share is in [0, 1]."""

    fused_pet_ct: float = 0.0  # share of PET (DRPE) images whose labels also name CT
    no_modality: float = 0.0  # share of all images whose labels name no modality
    composite: float = 0.0  # share of all images that are two-panel figures of two modalities (DRCO)

    @classmethod
    def realistic(cls) -> "DemoShares":
        """The default of the flat layouts: about half the PET images labelled PET/CT (as in the
        ROCOv2 run that kept 14 of 33 DRPE images), one image in ten without modality, one in twelve
        a two-modality composite."""
        return cls(fused_pet_ct=0.5, no_modality=0.1, composite=0.08)

    @classmethod
    def for_layout(cls, layout: str) -> "DemoShares":
        """Flat layouts get realistic labels (categories must come from them); folders2020 the plain story."""
        return cls() if layout == "folders2020" else cls.realistic()

    def check(self, out: Path) -> None:
        for name in ("fused_pet_ct", "no_modality", "composite"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DataError(out, f"share {name} = {value} must be between 0 and 1")

    def __bool__(self) -> bool:
        return any((self.fused_pet_ct, self.no_modality, self.composite))


def rare_pool(n_images: int) -> dict[str, list[str]]:
    """Synthetic rare CUIs per category, about three uses each; fixed for a dataset size, not the seed."""
    per_category = max(3, int(n_images * _RARE_PROBABILITY / 3 / len(CATEGORIES)))
    generator = np.random.default_rng(12345)
    numbers = generator.choice(1_000_000, size=per_category * len(CATEGORIES), replace=False)
    cuis = [f"C9{number:06d}" for number in numbers]
    return {category: cuis[i * per_category : (i + 1) * per_category] for i, category in enumerate(CATEGORIES)}


def sample_image(image_id: str, rng: np.random.Generator, rare: dict[str, list[str]], category: str | None = None) -> DemoImage:
    """Draw one image's category (unless given), region, findings and concept list (steps 1-5 of the story)."""
    categories = list(MODALITIES)
    if category is None:
        category = categories[rng.choice(len(categories), p=[MODALITIES[c].frequency for c in categories])]
    modality = MODALITIES[category]
    regions = list(modality.regions)
    region = regions[rng.choice(len(regions), p=list(modality.regions.values()))]
    findings = frozenset(
        finding
        for finding, probability in modality.findings.items()
        if region in _FINDINGS_BY_REGION.get(finding, {region}) and rng.random() < probability
    )
    cuis: list[str] = []
    rng.random()  # once decided whether the modality is listed; kept so the same seed gives the same images
    cuis.extend(modality.cuis)
    if rng.random() < 0.85:
        cuis.append(REGION_CUIS[region])
    if rng.random() < 0.6:
        organs = REGION_ORGANS[region]
        if region == "chest" and category in ("DRUS", "DRAN"):
            organs = ("heart",)
        cuis.append(ORGAN_CUIS[organs[rng.integers(len(organs))]])
    cuis.extend(FINDING_CUIS[finding] for finding in sorted(findings))
    cuis.extend(CAPTION_CUIS[key] for key, probability in modality.captions.items() if rng.random() < probability)
    if rng.random() < _RARE_PROBABILITY:
        pool = rare[category]
        cuis.append(pool[rng.integers(len(pool))])
    return DemoImage(image_id, category, region, findings, tuple(dict.fromkeys(cuis)))


def sample_demo_images(n_train: int, n_valid: int, n_test: int, rng: np.random.Generator) -> dict[str, list[DemoImage]]:
    """Every image's story, by split: the first draws of `make_demo_dataset` (rendering comes after)."""
    total = n_train + n_valid + n_test
    numbers = rng.choice(np.arange(10_000, 10_000 + max(90_000, 2 * total)), size=total, replace=False)
    rare = rare_pool(total)
    images = [sample_image(f"synpic{number}", rng, rare) for number in numbers]
    end_valid = n_train + n_valid
    return {"train": images[:n_train], "valid": images[n_train:end_valid], "test": images[end_valid:]}


_COMPOSITE_MODALITIES = ("DRCT", "DRXR", "DRMR", "DRUS", "DRAN", "DRPE")  # single modalities a composite's panels show


def realistic_labels(
    splits: dict[str, list[DemoImage]], shares: DemoShares, seed: int, rare: dict[str, list[str]]
) -> dict[str, list[DemoImage]]:
    """The images with realistic labels (module docstring), drawn from their own generator so that
    the plain story's draws, and hence every other image, stay as they are."""
    if not shares:
        return splits
    rng = np.random.default_rng([seed, 16])
    result: dict[str, list[DemoImage]] = {}
    for split, members in splits.items():
        changed = []
        for image in members:
            composite, fused, no_modality = rng.random(3)
            if composite < shares.composite:
                image = _composite(image, rng, rare)
            elif image.category == "DRPE" and fused < shares.fused_pet_ct:
                image = dataclasses.replace(image, cuis=_with_after(image.cuis, MODALITIES["DRPE"].cuis[-1], MODALITIES["DRCT"].cuis[0]))
            if no_modality < shares.no_modality:
                image = dataclasses.replace(image, cuis=tuple(cui for cui in image.cuis if cui not in MODALITY_CUIS))
            changed.append(image)
        result[split] = changed
    return result


MODALITY_CUIS = frozenset(cui for modality in MODALITIES.values() for cui in modality.cuis)


def _with_after(cuis: tuple[str, ...], after: str, added: str) -> tuple[str, ...]:
    listed = list(cuis)
    listed.insert(listed.index(after) + 1 if after in listed else 0, added)
    return tuple(dict.fromkeys(listed))


def _composite(image: DemoImage, rng: np.random.Generator, rare: dict[str, list[str]]) -> DemoImage:
    """A two-panel figure: the image's own story on the left, another modality's story on the right;
    filed as DRCO, listing both panels' concepts."""
    left = image.category
    shown = set(MODALITIES[left].cuis)
    others = [category for category in _COMPOSITE_MODALITIES if not shown.intersection(MODALITIES[category].cuis)]
    weights = np.array([MODALITIES[category].frequency for category in others])
    right = sample_image(image.image_id, rng, rare, category=others[rng.choice(len(others), p=weights / weights.sum())])
    return dataclasses.replace(
        image,
        category="DRCO",
        cuis=tuple(dict.fromkeys(image.cuis + right.cuis)),
        panel=DemoPanel(right.category, right.region, right.findings),
        panel_category=left,
    )


def render_demo_image(image: DemoImage, rng: np.random.Generator, panel_rng: np.random.Generator, size: int) -> np.ndarray:
    """The image's pixels: its story drawn with `rng` (as in the plain demo); a composite squeezes
    that drawing into the left half and draws its right panel with `panel_rng`."""
    if image.panel is None:
        return render_image(image.category, image.region, set(image.findings), rng, size)
    left = render_image(image.panel_category or image.category, image.region, set(image.findings), rng, size)
    right = render_image(image.panel.category, image.panel.region, set(image.panel.findings), panel_rng, size)
    half = size // 2
    panels = [np.asarray(Image.fromarray(pixels, "RGB").resize((width, size), Image.Resampling.BILINEAR)) for pixels, width in ((left, half), (right, size - half))]
    return np.concatenate(panels, axis=1)


def visible_concept_probabilities(image: DemoImage, rare: dict[str, list[str]]) -> dict[str, float]:
    """P(CUI listed | what the pixels show: modality, region, findings), from the generative story.

    A model that saw those three perfectly could do no better than these probabilities: organs
    are not drawn, caption concepts and rare CUIs are invisible, and listing is random. Decoding
    them with expected-F1 gives the demo's ceiling (benchmarks/demo_ceiling.py). A composite figure
    lists each panel's concepts: the larger probability of its two panels, each as a plain image.
    Realistic label noise (fused PET/CT, dropped modality) is not modelled: the ceiling is the plain story's.
    """
    if image.panel is not None:
        left = dataclasses.replace(image, category=image.panel_category or image.category, panel=None, panel_category=None)
        right = dataclasses.replace(image, category=image.panel.category, region=image.panel.region, findings=image.panel.findings, panel=None)
        merged = visible_concept_probabilities(left, rare)
        for cui, probability in visible_concept_probabilities(right, rare).items():
            merged[cui] = max(probability, merged.get(cui, 0.0))
        return merged
    modality = MODALITIES[image.category]
    probabilities = {**{cui: 1.0 for cui in modality.cuis}, REGION_CUIS[image.region]: 0.85}
    organs = REGION_ORGANS[image.region]
    if image.region == "chest" and image.category in ("DRUS", "DRAN"):
        organs = ("heart",)
    for organ in organs:
        probabilities[ORGAN_CUIS[organ]] = 0.6 / len(organs)
    probabilities.update({FINDING_CUIS[finding]: 1.0 for finding in image.findings})
    probabilities.update({CAPTION_CUIS[key]: probability for key, probability in modality.captions.items()})
    pool = rare[image.category]
    probabilities.update({cui: _RARE_PROBABILITY / len(pool) for cui in pool})
    return probabilities


DEMO_LAYOUTS = ("folders2020", "flat2025", "flat2026")
COMBINED_CONCEPTS_FILE = "ImageCLEFmedical_Caption_2026_concepts.csv"  # names no split: train and valid together
CUI_NAMES_FILE = "cui_mapping.csv"


def make_demo_dataset(
    out: Path | str,
    n_train: int = 700,
    n_valid: int = 350,
    n_test: int = 250,
    seed: int = 0,
    image_size: int = 128,
    layout: str = "folders2020",
    shares: DemoShares | None = None,
) -> dict:
    """Write the dataset under `out` and return a summary (counts per split and category, paths).

    `shares`: how realistic the labels are (None: `DemoShares.for_layout(layout)`, realistic for
    the flat layouts, plain for folders2020). The same seed and shares draw the same images and
    labels in every layout, so layouts can be compared:

    - folders2020: train/<CAT>/<ID>.jpg, valid/<CAT>/<ID>.jpg, train_concepts.csv and
      valid_concepts.csv (2020 TSV), test/<ID>.jpg (flat);
    - flat2025: train/<ID>.jpg, valid/<ID>.jpg, test/<ID>.jpg, the concept files as ``ID,CUIs``
      with header: categories must come from the labels;
    - flat2026: as flat2025 with 2026-style IDs (``ImageCLEFmedical_Caption_2026_train_<N>``),
      one combined concepts file for train and valid, and cui_mapping.csv (CUI, name).

    Held-out truth: test_concepts.csv and test_categories.csv. A folder written before by this
    function is replaced; any other non-empty folder is refused.
    """
    out = Path(out)
    if min(n_train, n_valid, n_test) < 1 or image_size < 16:
        raise DataError(out, "need at least one image per split and image_size >= 16")
    if layout not in DEMO_LAYOUTS:
        raise DataError(out, f"unknown demo layout {layout!r}; choose {', '.join(DEMO_LAYOUTS)}")
    shares = DemoShares.for_layout(layout) if shares is None else shares
    shares.check(out)
    _prepare_output(out)
    rng = np.random.default_rng(seed)
    splits = sample_demo_images(n_train, n_valid, n_test, rng)
    panel_rng = np.random.default_rng([seed, 17])
    splits = realistic_labels(splits, shares, seed, rare_pool(n_train + n_valid + n_test))
    splits = named_for_layout(splits, layout)
    flat = layout != "folders2020"
    for name, members in splits.items():
        for image in members:
            folder = out / name if name == "test" or flat else out / name / image.category
            folder.mkdir(parents=True, exist_ok=True)
            pixels = render_demo_image(image, rng, panel_rng, image_size)
            Image.fromarray(pixels, "RGB").save(folder / f"{image.image_id}.jpg", quality=90)
        if name == "test" or layout != "flat2026":
            _write_concepts(out / f"{name}_concepts.csv", members, with_header=flat)
    if layout == "flat2026":
        _write_concepts(out / COMBINED_CONCEPTS_FILE, splits["train"] + splits["valid"], with_header=True)
        _write_cui_names(out / CUI_NAMES_FILE, [image for members in splits.values() for image in members])
    categories = "".join(f"{image.image_id},{image.category}\n" for image in splits["test"])
    atomic_write_text(out / "test_categories.csv", "ID,CATEGORY\n" + categories)
    summary = _summary(out, splits, seed, image_size, layout, shares)
    atomic_write_json(out / DEMO_MARKER, summary)
    return summary


def named_for_layout(splits: dict[str, list[DemoImage]], layout: str) -> dict[str, list[DemoImage]]:
    """The images with the IDs of `layout`: 2026 IDs name their split, which is how the combined
    concepts file is divided; the other layouts keep the synpic IDs."""
    if layout != "flat2026":
        return splits
    return {
        split: [dataclasses.replace(image, image_id=f"ImageCLEFmedical_Caption_2026_{split}_{image.image_id.removeprefix('synpic')}") for image in members]
        for split, members in splits.items()
    }


def _prepare_output(out: Path) -> None:
    """Clear a previous demo (so stale images and concept files cannot outlive it); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = out / DEMO_MARKER
        if not marker.is_file() or not isinstance(read_json(marker), dict):
            raise DataError(out, "folder is not empty and was not written by make-demo; choose another folder")
        for name in ("train", "valid", "test"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("train_concepts.csv", "valid_concepts.csv", COMBINED_CONCEPTS_FILE, CUI_NAMES_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_concepts(path: Path, images: list[DemoImage], with_header: bool = False) -> None:
    if with_header:  # 2025/2026: ID,CUIs
        atomic_write_text(path, "ID,CUIs\n" + "".join(f"{image.image_id},{';'.join(image.cuis)}\n" for image in images))
    else:  # 2020: ID<TAB>CUI;CUI
        atomic_write_text(path, "".join(f"{image.image_id}\t{';'.join(image.cuis)}\n" for image in images))


def _write_cui_names(path: Path, images: list[DemoImage]) -> None:
    named = {cui: name for name, cui in {**REGION_CUIS, **ORGAN_CUIS, **FINDING_CUIS, **CAPTION_CUIS}.items()}
    named.update({cui: modality.name for modality in MODALITIES.values() for cui in modality.cuis[:1]})
    named["C0040405"] = MODALITIES["DRCT"].name
    cuis = sorted({cui for image in images for cui in image.cuis})
    rows = "".join(f'{cui},"{named.get(cui, "synthetic rare concept")}"\n' for cui in cuis)
    atomic_write_text(path, "CUI,Canonical name\n" + rows)


def _summary(out: Path, splits: dict[str, list[DemoImage]], seed: int, image_size: int, layout: str, shares: DemoShares) -> dict:
    all_images = [image for members in splits.values() for image in members]
    vocabulary = {cui for image in all_images for cui in image.cuis}
    concept_files = (
        {"train_valid_concepts": str(out / COMBINED_CONCEPTS_FILE), "cui_names": str(out / CUI_NAMES_FILE)}
        if layout == "flat2026"
        else {"train_concepts": str(out / "train_concepts.csv"), "valid_concepts": str(out / "valid_concepts.csv")}
    )
    return {
        "out": str(out),
        "seed": seed,
        "image_size": image_size,
        "layout": layout,
        "shares": dataclasses.asdict(shares),
        "labels": {
            "fused_pet_ct": sum(image.category == "DRPE" and MODALITIES["DRCT"].cuis[0] in image.cuis for image in all_images),
            "no_modality": sum(not MODALITY_CUIS.intersection(image.cuis) for image in all_images),
            "composite": sum(image.panel is not None for image in all_images),
        },
        "splits": {
            name: {
                "images": len(members),
                "categories": dict(sorted(Counter(image.category for image in members).items())),
            }
            for name, members in splits.items()
        },
        "vocabulary_size": len(vocabulary),
        "concepts_per_image": round(float(np.mean([len(image.cuis) for image in all_images])), 2),
        "paths": {
            "train_images": str(out / "train"),
            "valid_images": str(out / "valid"),
            "test_images": str(out / "test"),
            **concept_files,
            "test_concepts": str(out / "test_concepts.csv"),
            "test_categories": str(out / "test_categories.csv"),
        },
    }
