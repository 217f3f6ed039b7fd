"""Drawing of the synthetic radiology images used by data.demo (numpy only, ~1 ms per image).

Each modality has its own look, as in real ImageCLEF data, so a router can learn the modality
from pixels and a per-modality model sees a narrower distribution:

- CT (DRCT): grey body cross-section on black with a bright bone ring / spine, fine noise.
- MR (DRMR): the same anatomy with soft contrast, dark cortical bone, bright fat, smooth texture.
- XR (DRXR): a projection, bright bones (ribs, long bones, skull) on a dark background.
- US (DRUS): a speckled fan-shaped sector on black; Doppler adds a red/blue colour patch.
- AN (DRAN): dark branching vessels on a light background; contrast darkens them, a stent is a mesh.
- PE (DRPE): blurry hot spots on black, rendered with a "hot" colour map.
- CO (DRCO): a CT cross-section with a PET-like colour overlay (PET/CT fusion).

Findings (mass, cyst, calcification, fracture, effusion, stent, stenosis, contrast, Doppler) are
drawn where the anatomy allows them, so a visible concept has a local, learnable signature.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x (left->right) and y (top->bottom) coordinates in [-1, 1]."""
    y, x = np.mgrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j]
    return x.astype(np.float32), y.astype(np.float32)


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    x, y = _grid(size)
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _blob(size: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    x, y = _grid(size)
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * sigma**2)).astype(np.float32)


def _segment_distance(size: int, ax: float, ay: float, bx: float, by: float) -> np.ndarray:
    x, y = _grid(size)
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(x - (ax + t * dx), y - (ay + t * dy))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise varying over about size/cells pixels (tissue texture)."""
    coarse = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.Resampling.BICUBIC))


def _pick_point(rng: np.random.Generator, size: int, mask: np.ndarray) -> tuple[float, float]:
    """A random point inside `mask` (falls back to the centre when the mask is empty)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0.0, 0.0
    index = rng.integers(rows.size)
    x, y = _grid(size)
    return float(x[rows[index], cols[index]]), float(y[rows[index], cols[index]])


def _blur(values: np.ndarray, factor: int) -> np.ndarray:
    """Lose detail below `factor` pixels (MR's lower resolution, PET's much lower one)."""
    size = values.shape[0]
    small = Image.fromarray(np.clip(values, 0, 1).astype(np.float32), "F").resize((size // factor, size // factor))
    return np.clip(np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32), 0, 1)


def _hot(values: np.ndarray) -> np.ndarray:
    """The 'hot' colour map (black-red-yellow-white) used for PET."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(values, 0.0, 1.0)[..., None], 3, axis=-1)


# ---- cross-sections (CT, MR, PET/CT) -------------------------------------------------------------


def _pair(size: int, cx: float, dx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Two mirror-image ellipses at cx - dx and cx + dx (lungs, kidneys, thighs)."""
    return _ellipse(size, cx - dx, cy, rx, ry) | _ellipse(size, cx + dx, cy, rx, ry)


def _cross_section(size: int, region: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Masks of an axial slice: body, bone, air (lungs), fat, organ and `inner` (where findings go)."""
    jx, jy = rng.uniform(-0.05, 0.05, 2)
    s = rng.uniform(0.9, 1.05)
    empty = np.zeros((size, size), dtype=bool)
    if region == "head":
        outer = _ellipse(size, jx, jy, 0.75 * s, 0.88 * s)
        inner = _ellipse(size, jx, jy, 0.66 * s, 0.79 * s)
        return {"body": outer, "bone": outer & ~inner, "air": empty, "fat": empty, "organ": inner, "inner": inner}
    if region == "chest":
        body = _ellipse(size, jx, jy, 0.92 * s, 0.62 * s)
        spine = _ellipse(size, jx, jy + 0.45 * s, 0.1 * s, 0.1 * s)
        ring = body & ~_ellipse(size, jx, jy, 0.84 * s, 0.55 * s)
        ribs = ring & (np.sin(_grid(size)[0] * 22.0) > 0.3)
        heart = _ellipse(size, jx + 0.08, jy + 0.1, 0.2, 0.18)
        lungs = _pair(size, jx, 0.4 * s, jy - 0.05, 0.3 * s, 0.42 * s)
        return {"body": body, "bone": spine | ribs, "air": lungs, "fat": ring & ~ribs, "organ": heart,
                "inner": body & ~ring & ~spine}
    if region == "abdomen":
        body = _ellipse(size, jx, jy, 0.86 * s, 0.7 * s)
        fat = body & ~_ellipse(size, jx, jy, 0.78 * s, 0.62 * s)
        spine = _ellipse(size, jx, jy + 0.45 * s, 0.11 * s, 0.11 * s)
        liver = _ellipse(size, jx - 0.35 * s, jy - 0.1, 0.35 * s, 0.3 * s)
        organs = liver | _pair(size, jx, 0.35 * s, jy + 0.3, 0.1, 0.14)  # liver and kidneys
        return {"body": body, "bone": spine, "air": empty, "fat": fat, "organ": organs, "inner": body & ~fat & ~spine}
    # limb: both thighs at knee level, each a soft-tissue disk around a bone
    body = _pair(size, jx, 0.45, jy, 0.36 * s, 0.4 * s)
    bone = _pair(size, jx, 0.45, jy, 0.13 * s, 0.13 * s)
    fat = body & ~_pair(size, jx, 0.45, jy, 0.3 * s, 0.34 * s)
    muscle = body & ~bone & ~fat
    return {"body": body, "bone": bone, "air": empty, "fat": fat, "organ": muscle, "inner": muscle}


def _cross_section_findings(
    image: np.ndarray,
    masks: dict[str, np.ndarray],
    findings: set[str],
    rng: np.random.Generator,
    bright: float,
    dark: float,
) -> None:
    """Draw the findings of a cross-section in place, inside the anatomy that can hold them."""
    size = image.shape[0]
    if "mass" in findings:
        cx, cy = _pick_point(rng, size, masks["inner"] & ~masks["air"])
        blob = _blob(size, cx, cy, rng.uniform(0.05, 0.09))
        image[:] = np.maximum(image, bright * blob * (blob > 0.2))
    if "cyst" in findings:
        cx, cy = _pick_point(rng, size, masks["inner"] & ~masks["air"])
        image[_ellipse(size, cx, cy, *(rng.uniform(0.06, 0.11, 2)))] = dark
    if "calcification" in findings:
        cx, cy = _pick_point(rng, size, masks["inner"])
        for _ in range(int(rng.integers(3, 7))):
            image[_ellipse(size, cx + rng.normal(0, 0.06), cy + rng.normal(0, 0.06), 0.022, 0.022)] = 1.0
    if "fracture" in findings:
        cx, cy = _pick_point(rng, size, masks["bone"])
        angle = rng.uniform(0, np.pi)
        line = _segment_distance(size, cx - 0.15 * np.cos(angle), cy - 0.15 * np.sin(angle),
                                 cx + 0.15 * np.cos(angle), cy + 0.15 * np.sin(angle)) < 0.018
        image[line & masks["bone"]] = dark
    if "effusion" in findings and masks["air"].any():
        _, y = _grid(size)
        image[masks["air"] & (y > rng.uniform(0.0, 0.2))] = 0.5  # fluid settles at the back of the lung


def _render_ct(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    masks = _cross_section(size, region, rng)
    image = np.zeros((size, size), dtype=np.float32)
    image[masks["body"]] = 0.5
    image[masks["fat"]] = 0.36
    image[masks["organ"]] = 0.6 if "contrast" in findings else 0.54
    image[masks["air"]] = 0.04
    image[masks["bone"]] = 0.95
    if "contrast" in findings and region in ("chest", "abdomen"):
        cx, cy = _pick_point(rng, size, masks["inner"] & ~masks["air"])
        image[_ellipse(size, cx, cy, 0.06, 0.06)] = 0.88  # enhanced aorta
    _cross_section_findings(image, masks, findings, rng, bright=0.82, dark=0.16)
    return _gray(image + rng.normal(0, 0.025, image.shape).astype(np.float32) * masks["body"])


def _render_mr(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    masks = _cross_section(size, region, rng)
    texture = _smooth_noise(rng, size, 12)
    image = np.zeros((size, size), dtype=np.float32)
    image[masks["body"]] = 0.45
    image[masks["organ"]] = 0.52
    if region == "head":  # grey/white-matter folds
        x, y = _grid(size)
        image += 0.08 * np.sin(9 * x + 3 * texture) * np.cos(8 * y) * masks["organ"]
    image[masks["fat"]] = 0.85
    image[masks["air"]] = 0.03
    image[masks["bone"]] = 0.12  # cortical bone gives no MR signal
    image += 0.05 * texture * masks["body"]
    _cross_section_findings(image, masks, findings, rng, bright=0.95, dark=0.08)
    return _gray(_blur(image, 2) ** 0.8)


def _render_petct(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    rgb = _render_ct(size, region, findings - {"mass"}, rng)
    masks = _cross_section(size, region, rng)
    uptake = 0.35 * _blob(size, *_pick_point(rng, size, masks["organ"]), 0.15) * masks["body"]
    if "mass" in findings:
        uptake = np.maximum(uptake, _blob(size, *_pick_point(rng, size, masks["inner"]), rng.uniform(0.05, 0.09)))
    alpha = np.clip(uptake * 1.4, 0, 0.85)[..., None]
    return rgb * (1 - alpha) + _hot(uptake + 0.25) * alpha


# ---- projections and other modalities ------------------------------------------------------------


def _render_xr(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    jx = rng.uniform(-0.06, 0.06)
    image = np.full((size, size), 0.06, dtype=np.float32)
    bone = np.zeros((size, size), dtype=bool)
    soft = np.zeros((size, size), dtype=bool)
    if region == "chest":
        soft = _ellipse(size, jx, 0.05, 0.88, 1.05)
        image[soft] = 0.32
        lungs = _ellipse(size, jx - 0.38, -0.02, 0.28, 0.6) | _ellipse(size, jx + 0.38, -0.02, 0.28, 0.6)
        image[lungs] = 0.13
        for k in range(7):  # ribs: arcs across both lungs
            arc = np.abs(y - (-0.55 + 0.17 * k + 0.3 * (x - jx) ** 2)) < 0.025
            bone |= arc & soft & (np.abs(x - jx) > 0.08)
        bone |= np.abs(x - jx) < 0.07  # spine
        image[bone & soft] += 0.38
        image[_ellipse(size, jx + 0.08, 0.25, 0.25, 0.22)] = 0.55  # heart shadow
        inner = lungs
        if "effusion" in findings:
            image[lungs & (y > rng.uniform(0.25, 0.4))] = 0.5
    elif region == "limb":
        soft = np.abs(x - jx) < 0.42
        image[soft] = 0.25
        bone = ((np.abs(x - jx) < 0.11) & (y < -0.06)) | ((np.abs(x - jx) < 0.13) & (y > 0.06))
        image[bone] = 0.85
        inner = soft & ~bone
    elif region == "head":
        skull = _ellipse(size, jx, 0.0, 0.72, 0.85)
        soft = skull
        bone = skull & ~_ellipse(size, jx, 0.0, 0.65, 0.78)
        image[skull] = 0.3
        image[bone] = 0.85
        inner = skull & ~bone
    else:  # abdomen
        soft = _ellipse(size, jx, 0.0, 0.85, 1.1)
        image[soft] = 0.36
        bone = (np.abs(x - jx) < 0.08) | (_ellipse(size, jx, 0.95, 0.6, 0.35) & ~_ellipse(size, jx, 0.95, 0.45, 0.25))
        bone &= soft
        image[bone] = 0.8
        for _ in range(4):  # bowel gas
            image[_ellipse(size, *_pick_point(rng, size, soft & ~bone), 0.06, 0.05)] = 0.15
        inner = soft & ~bone
    if "mass" in findings:
        cx, cy = _pick_point(rng, size, inner)
        image = np.maximum(image, 0.65 * _blob(size, cx, cy, rng.uniform(0.06, 0.1)))
    if "calcification" in findings:
        cx, cy = _pick_point(rng, size, inner)
        for _ in range(int(rng.integers(3, 7))):
            image[_ellipse(size, cx + rng.normal(0, 0.07), cy + rng.normal(0, 0.07), 0.02, 0.02)] = 0.98
    if "fracture" in findings:
        cx, cy = _pick_point(rng, size, bone & soft)
        tilt = rng.uniform(-0.6, 0.6)
        line = _segment_distance(size, cx - 0.25, cy - 0.25 * tilt, cx + 0.25, cy + 0.25 * tilt) < 0.02
        image[line & bone] = 0.15
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return _gray(image)


def _render_us(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    depth = np.hypot(x, y + 1.0)
    angle = np.arctan2(x, y + 1.0)
    half_angle = rng.uniform(0.55, 0.7)
    fan = (np.abs(angle) < half_angle) & (depth > 0.2) & (depth < 1.9)
    echo = np.full((size, size), 0.45, dtype=np.float32) * np.exp(-0.35 * depth)
    if region == "abdomen":  # liver with a kidney (bright rim) and gallbladder
        echo[_ellipse(size, 0.2, 0.4, 0.3, 0.18)] = 0.65
        echo[_ellipse(size, 0.2, 0.4, 0.2, 0.1)] = 0.3
        echo[_ellipse(size, -0.3, 0.0, 0.15, 0.09)] = 0.03
    elif region == "chest":  # heart chambers
        for cx, cy in ((-0.2, 0.1), (0.2, 0.1), (-0.15, 0.6), (0.18, 0.6)):
            echo[_ellipse(size, cx, cy, 0.16, 0.2)] = 0.04
    else:  # muscle fibres in layers
        echo *= 1.0 + 0.4 * np.sin(y * 30 + 2 * x)
    inner = fan & (depth > 0.4) & (depth < 1.6)
    if "mass" in findings:
        cx, cy = _pick_point(rng, size, inner)
        echo = np.maximum(echo, 0.75 * _blob(size, cx, cy, 0.08))
    if "cyst" in findings:
        cx, cy = _pick_point(rng, size, inner)
        r = rng.uniform(0.08, 0.13)
        echo[_ellipse(size, cx, cy + 1.6 * r, r, 0.8 * r)] *= 1.6  # posterior acoustic enhancement
        echo[_ellipse(size, cx, cy, r, r)] = 0.02
    speckle = rng.rayleigh(0.8, (size, size)).astype(np.float32)
    gray = np.clip(echo * speckle, 0, 1) * fan
    gray[(np.abs(x + 0.92) < 0.02) & (np.mod(y, 0.2) < 0.03)] = 0.9  # depth scale ticks
    rgb = _gray(gray)
    if "doppler" in findings:
        cx, cy = _pick_point(rng, size, inner)
        patch = _ellipse(size, cx, cy, 0.14, 0.2) & fan
        upper = patch & (y < cy)
        rgb[upper] = (0.9, 0.1, 0.05)
        rgb[patch & ~upper] = (0.1, 0.25, 0.95)
    return rgb


def _vessel_tree(size: int, region: str, rng: np.random.Generator) -> list[tuple[float, float, float, float, float]]:
    """Branching segments (ax, ay, bx, by, width) from a root that depends on the region."""
    roots = {"head": (0.0, 1.0, -np.pi / 2), "chest": (-0.6, -0.8, 0.9), "abdomen": (0.0, -1.0, np.pi / 2)}
    x0, y0, heading = roots.get(region, (0.0, 1.0, -np.pi / 2))
    segments: list[tuple[float, float, float, float, float]] = []
    stack = [(x0, y0, heading, 0.05, 0)]
    while stack and len(segments) < 40:
        ax, ay, direction, width, level = stack.pop()
        length = rng.uniform(0.25, 0.45) * (0.85**level)
        bx, by = ax + length * np.cos(direction), ay + length * np.sin(direction)
        segments.append((ax, ay, bx, by, width))
        if level < 4:
            for turn in (-1, 1):
                stack.append((bx, by, direction + turn * rng.uniform(0.3, 0.8), width * 0.72, level + 1))
    return segments


def _render_an(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    segments = _vessel_tree(size, region, rng)
    vessel = np.zeros((size, size), dtype=np.float32)
    for ax, ay, bx, by, width in segments:
        vessel = np.maximum(vessel, np.clip(1.0 - _segment_distance(size, ax, ay, bx, by) / width, 0, 1))
    darkness = 0.7 if "contrast" in findings else 0.3
    image = 0.82 - 0.1 * (x**2 + y**2) + 0.04 * _smooth_noise(rng, size, 6) - darkness * vessel
    ax, ay, bx, by, width = segments[0]
    if "stenosis" in findings:  # a short narrowing of the main vessel
        t = rng.uniform(0.3, 0.7)
        cx, cy = ax + t * (bx - ax), ay + t * (by - ay)
        image[_ellipse(size, cx, cy, 0.05, 0.05) & (vessel < 0.6)] += 0.5 * darkness
    if "stent" in findings:  # radio-opaque mesh along the main vessel
        crosshatch = (np.sin(60 * (x + y)) > 0.5) | (np.sin(60 * (x - y)) > 0.5)
        mesh = (_segment_distance(size, ax, ay, bx, by) < width * 1.1) & crosshatch
        image[mesh] = 0.05
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return _gray(image)


def _render_pet(size: int, region: str, findings: set[str], rng: np.random.Generator) -> np.ndarray:
    body = _ellipse(size, 0.0, 0.0, 0.55, 0.95)
    uptake = 0.12 * body.astype(np.float32)
    hot_spots = {"head": [(0.0, -0.2, 0.3, 0.9)], "chest": [(0.1, 0.0, 0.15, 0.7), (0.0, 0.75, 0.1, 0.5)],
                 "abdomen": [(-0.25, 0.0, 0.08, 0.6), (0.25, 0.0, 0.08, 0.6), (0.0, 0.75, 0.12, 0.9)]}
    for cx, cy, sigma, level in hot_spots.get(region, hot_spots["abdomen"]):
        uptake += level * _blob(size, cx + rng.normal(0, 0.03), cy + rng.normal(0, 0.03), sigma)
    if "mass" in findings:
        for _ in range(int(rng.integers(1, 4))):
            uptake += rng.uniform(0.6, 1.0) * _blob(size, *_pick_point(rng, size, body), rng.uniform(0.04, 0.07))
    uptake = uptake * rng.gamma(20.0, 1 / 20.0, uptake.shape).astype(np.float32)  # counting noise
    return _hot(_blur(uptake, 4))


RENDERERS = {
    "DRCT": _render_ct,
    "DRMR": _render_mr,
    "DRXR": _render_xr,
    "DRUS": _render_us,
    "DRAN": _render_an,
    "DRPE": _render_pet,
    "DRCO": _render_petct,
}


def render_image(category: str, region: str, findings: set[str], rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of a modality category, body region and set of findings."""
    rgb = RENDERERS[category](size, region, findings, rng)
    gain = rng.uniform(0.9, 1.1)  # scanner/window variation
    return np.clip(rgb * gain * 255.0, 0, 255).astype(np.uint8)
