"""Deterministic synthetic chest X-ray "phantoms" and datasets (numpy + Pillow only, no torch).

Anatomy model, in normalised coordinates u, v in [-1, 1] (v down), with a per-image rotation, zoom
and shift: dark air around a bright soft-tissue torso (rounded box); two darker lung fields (tilted
ellipses narrowing to the apex, cut below by diaphragm domes, their darkness fading to the edges)
from which the heart (an ellipse low and to the image right) is cut away; a bright spine with
vertebrae; clavicles; ribs as periodic curved bright bands (posterior strong, anterior faint) that
show mostly over the lungs; hilar brightness; lung texture, smooth exposure noise, quantum noise
and a random global contrast / brightness / gamma. Lesions are blurred bright textured opacities
whose disc (centre x, y and radius r in pixels) lies inside a lung field; their mask is returned
so explainers and anomaly detectors can be checked against known positions.

Lesion patterns: ``"focal"`` (one consolidation-like blob, r = 4-10 % of the image size),
``"lobar"`` (one large dense consolidation confined to the lung, the BACTERIA class) and
``"diffuse"`` (4-7 small faint patches in both lungs, the VIRUS class).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.errors import DataError, UsageError

__all__ = [
    "CLASS_PATTERNS",
    "PATTERNS",
    "MANIFEST_COLUMNS",
    "phantom",
    "lesion_mask",
    "make_arrays",
    "write_dataset",
    "parse_lesions",
]

PATTERNS = ("focal", "lobar", "diffuse")
#: Class name (case-insensitive) -> lesion pattern (None: no lesion).
CLASS_PATTERNS: dict[str, str | None] = {
    "NORMAL": None,
    "LESION": "focal",
    "PNEUMONIA": "focal",
    "BACTERIA": "lobar",
    "VIRUS": "diffuse",
}
MANIFEST_COLUMNS = ("path", "label", "patient_id", "lesion_x", "lesion_y", "lesion_r")
LAYOUTS = ("folders", "flat")


# --------------------------------------------------------------------------------------------------
# cached grids and interpolation matrices


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates u (columns) and v (rows), in [-1, 1]."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    u, v = np.meshgrid(t, t)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


@functools.lru_cache(maxsize=64)
def _interp(size: int, n: int) -> np.ndarray:
    """(size, n) row-normalised Gaussian interpolation matrix: smooth upsampling of an n-point grid."""
    x = (np.arange(size, dtype=np.float64) + 0.5) / size
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    w = np.exp(-(((x[:, None] - c[None, :]) * n / 0.9) ** 2))
    m = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    m.setflags(write=False)
    return m


def _smooth_noise(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean noise of roughly unit standard deviation with about n blobs per side."""
    m = _interp(size, n)
    g = rng.standard_normal((n, n)).astype(np.float32)
    out = m @ g @ m.T
    return out * np.float32(1.0 / max(float(out.std()), 1e-6))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _soft_inside(d: np.ndarray, edge: float) -> np.ndarray:
    """1 well inside (d < 1), 0 outside, with a smooth ramp of width ``edge`` around d == 1."""
    return _smoothstep((1.0 + edge / 2 - d) / edge)


# --------------------------------------------------------------------------------------------------
# anatomy parameters


def _sample_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Draw the per-patient anatomy (shapes, positions, rib spacing, densities)."""
    r = rng.uniform
    lungs = []
    for side in (-1.0, 1.0):
        lungs.append(
            {
                "cx": side * r(0.33, 0.40),
                "cy": r(-0.05, 0.05),
                "a": r(0.28, 0.34),
                "b": r(0.64, 0.74),
                "tilt": side * r(0.02, 0.14),
                "taper": r(0.15, 0.35),
            }
        )
    return {
        "rot": r(-0.06, 0.06),
        "zoom": r(0.93, 1.07),
        "tx": r(-0.05, 0.05),
        "ty": r(-0.05, 0.05),
        "body_w": r(0.82, 0.96),
        "body_cy": r(0.15, 0.3),
        "body_box": r(0.3, 0.6),
        "lungs": lungs,
        "lung_depth": r(0.30, 0.38),
        "diaphragm": [r(0.42, 0.55), r(0.48, 0.62)],  # dome top per lung (the image-right one lower)
        "dome_curv": r(0.9, 1.5),
        "heart": {"cx": r(0.07, 0.15), "cy": r(0.38, 0.48), "a": r(0.27, 0.34), "b": r(0.24, 0.32)},
        "spine_w": r(0.05, 0.07),
        "vert_period": r(0.10, 0.13),
        "rib_v0": r(-0.85, -0.75),
        "rib_sp": r(0.14, 0.17),
        "rib_curv": r(0.5, 0.8),
        "rib_amp": r(0.07, 0.11),
        "clav_v": r(-0.74, -0.64),
        "clav_slope": r(-0.35, -0.15),
    }


def _jitter_anatomy(anat: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A follow-up image of the same patient: same anatomy, slightly different positioning."""
    out = dict(anat)
    out["rot"] = anat["rot"] + rng.uniform(-0.02, 0.02)
    out["zoom"] = anat["zoom"] * rng.uniform(0.98, 1.02)
    out["tx"] = anat["tx"] + rng.uniform(-0.02, 0.02)
    out["ty"] = anat["ty"] + rng.uniform(-0.02, 0.02)
    out["lung_depth"] = anat["lung_depth"] * rng.uniform(0.95, 1.05)
    return out


# --------------------------------------------------------------------------------------------------
# rendering


def lesion_mask(size: int, lesions: Sequence[dict[str, float]]) -> np.ndarray:
    """Boolean (size, size) mask of the union of the lesion discs ``{"x", "y", "r"}`` (pixels)."""
    mask = np.zeros((size, size), dtype=bool)
    for les in lesions:
        x, y, r = float(les["x"]), float(les["y"]), float(les["r"])
        x0, x1 = max(int(math.floor(x - r)), 0), min(int(math.ceil(x + r)) + 1, size)
        y0, y1 = max(int(math.floor(y - r)), 0), min(int(math.ceil(y + r)) + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    return mask


def _place_disc(
    lung: np.ndarray,
    rng: np.random.Generator,
    r: float,
    candidates: Sequence[tuple[float, float, float, float]],
    need_inside: bool = True,
    tries: int = 40,
) -> tuple[int, int, float] | None:
    """Pick an integer centre whose disc of radius r lies inside ``lung`` (or whose centre does).

    ``candidates`` are (cx, cy, ax, ay) pixel ellipses (lungs) to sample centres from.
    """
    size = lung.shape[0]
    for attempt in range(tries * 3):
        if attempt and attempt % tries == 0:
            r *= 0.8  # the lung is too small for this lesion: shrink it
        cx, cy, ax, ay = candidates[int(rng.integers(len(candidates)))]
        ang = rng.uniform(0.0, 2.0 * math.pi)
        rho = math.sqrt(rng.uniform(0.0, 1.0))
        x = int(round(cx + rho * ax * math.cos(ang)))
        y = int(round(cy + rho * ay * math.sin(ang)))
        if not (0 <= x < size and 0 <= y < size) or not lung[y, x]:
            continue
        if need_inside:
            ri = int(math.ceil(r))
            if x - ri < 0 or y - ri < 0 or x + ri >= size or y + ri >= size:
                continue
            yy, xx = np.ogrid[-ri : ri + 1, -ri : ri + 1]
            disc = xx * xx + yy * yy <= r * r
            if not lung[y - ri : y + ri + 1, x - ri : x + ri + 1][disc].all():
                continue
        return x, y, r
    return None


def _lesion_field(
    size: int,
    x: float,
    y: float,
    r: float,
    sharp: float,
    texture: np.ndarray,
) -> np.ndarray:
    """Blurred blob of peak ~1 at (x, y) that is ~0.5 at radius r, with a mottled texture."""
    idx = np.arange(size, dtype=np.float32)
    dx2 = (idx - np.float32(x)) ** 2
    dy2 = (idx - np.float32(y)) ** 2
    d2 = (dy2[:, None] + dx2[None, :]) * np.float32(1.0 / (r * r))
    # generalised Gaussian: exp(-ln2 * (d/r)^(2*sharp)); sharp > 1 gives a denser, flatter plateau
    if sharp == 1.0:
        blob = np.exp(np.float32(-math.log(2.0)) * d2)
    else:
        blob = np.exp(np.float32(-math.log(2.0)) * d2 ** np.float32(sharp))
    return blob * (np.float32(0.8) + np.float32(0.2) * texture)


def _render(
    size: int,
    anat: dict[str, Any],
    rng: np.random.Generator,
    pattern: str | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    f32 = np.float32
    u0, v0 = _grid(size)
    # patient positioning: rotation, zoom, shift (coordinates of the anatomy frame)
    c, s = math.cos(anat["rot"]), math.sin(anat["rot"])
    z = 1.0 / anat["zoom"]
    u = (f32(c * z) * u0 - f32(s * z) * v0) - f32(anat["tx"])
    v = (f32(s * z) * u0 + f32(c * z) * v0) - f32(anat["ty"])

    # torso: a rounded box, open to the bottom of the image
    bu = np.abs(u * f32(1.0 / anat["body_w"]))
    bv = np.abs((v - f32(anat["body_cy"])) * f32(1.0 / 1.25))
    box = f32(anat["body_box"])
    body = _soft_inside(box * np.maximum(bu, bv) + (f32(1.0) - box) * np.sqrt(bu * bu + bv * bv), 0.08)

    # heart
    h = anat["heart"]
    hd = np.sqrt(((u - f32(h["cx"])) * f32(1 / h["a"])) ** 2 + ((v - f32(h["cy"])) * f32(1 / h["b"])) ** 2)
    heart = _soft_inside(hd, 0.25)

    # lungs: ellipses narrowing towards the apex, cut by the diaphragm domes, heart cut out; the
    # darkness fades towards the edges (the lung is thinner there)
    lung = np.zeros_like(u)
    depth = np.zeros_like(u)
    for L, dome in zip(anat["lungs"], anat["diaphragm"], strict=True):
        cl, sl = math.cos(L["tilt"]), math.sin(L["tilt"])
        du, dv = u - f32(L["cx"]), v - f32(L["cy"])
        pu = f32(cl) * du + f32(sl) * dv
        qv = (f32(-sl) * du + f32(cl) * dv) * f32(1.0 / L["b"])
        width = f32(L["a"]) * (f32(1.0 - L["taper"] * 0.5) + f32(L["taper"] * 0.5) * np.clip(qv, -1.0, 1.0))
        d2 = (pu / width) ** 2 + qv * qv
        inside = _soft_inside(np.sqrt(d2), 0.1)
        inside *= _smoothstep((f32(dome) + f32(anat["dome_curv"]) * du * du - v) * f32(1.0 / 0.05) + 0.5)
        np.maximum(lung, inside, out=lung)
        np.maximum(depth, inside * (f32(1.0) - f32(0.35) * np.minimum(d2, f32(1.0))), out=depth)
    lung *= 1.0 - heart
    depth *= 1.0 - heart

    # spine with vertebral bodies, visible through the mediastinum
    au = np.abs(u)
    spine = _soft_inside(au * f32(1.0 / anat["spine_w"]), 0.5)
    spine *= f32(0.75) + f32(0.25) * np.cos(v * f32(2 * math.pi / anat["vert_period"]))

    # posterior ribs: periodic bands in a curved phase field; anterior ribs curve the other way
    lat = np.maximum(au - f32(anat["spine_w"]), 0.0)
    phase = (v - f32(anat["rib_v0"]) - f32(anat["rib_curv"]) * lat * lat) * f32(1.0 / anat["rib_sp"])
    frac = phase - np.floor(phase)
    ribs = _smoothstep(1.0 - np.abs(frac - 0.5) * f32(1.0 / 0.32))
    ribs *= (phase > 0.0) & (phase < 10.0)
    phase_a = (v - f32(anat["rib_v0"] + 0.25) + f32(0.5) * lat) * f32(1.0 / (anat["rib_sp"] * 1.1))
    frac_a = phase_a - np.floor(phase_a)
    ribs += (
        f32(0.35)
        * _smoothstep(1.0 - np.abs(frac_a - 0.5) * f32(1.0 / 0.2))
        * ((phase_a > 0.0) & (phase_a < 6.0) & (lat > 0.08))
    )

    # clavicles
    clav_c = f32(anat["clav_v"]) + f32(anat["clav_slope"]) * lat
    clav = _smoothstep(1.0 - np.abs(v - clav_c) * f32(1.0 / 0.045)) * ((lat > 0.04) & (lat < 0.6))

    # hilar brightness near the mediastinum, inside the lungs
    hilum = np.exp(-(((au - f32(0.18)) * f32(1 / 0.1)) ** 2 + ((v - f32(0.0)) * f32(1 / 0.25)) ** 2))

    texture = _smooth_noise(size, 14, rng)
    img = f32(0.04) + f32(0.5) * body
    img += f32(0.05) * body * np.clip(v, 0.0, 1.0)  # thicker abdomen below the diaphragm
    img -= f32(anat["lung_depth"]) * depth * (f32(1.0) - f32(0.3) * hilum)
    img += f32(0.035) * lung * texture  # vascular / parenchymal texture
    img += f32(0.025) * heart * body
    img += f32(0.14) * spine * body * (f32(1.0) - f32(0.5) * heart)
    img += f32(anat["rib_amp"]) * ribs * body * (f32(0.25) + f32(0.75) * lung)
    img += f32(0.12) * clav * body

    # lesions
    lung_hard = lung >= 0.5
    lesions: list[dict[str, float]] = []
    if pattern is not None:
        if pattern not in PATTERNS:
            raise UsageError(f"unknown lesion pattern {pattern!r}; valid patterns: {', '.join(PATTERNS)}")
        half = size / 2.0
        ellipses = []
        for L in anat["lungs"]:
            # lung centre/axes in pixels of the output image (inverse positioning transform)
            lu, lv = L["cx"] + anat["tx"], L["cy"] + anat["ty"]
            zu = anat["zoom"] * (c * lu + s * lv)
            zv = anat["zoom"] * (-s * lu + c * lv)
            ellipses.append(
                (
                    (zu + 1) * half - 0.5,
                    (zv + 1) * half - 0.5,
                    L["a"] * half * anat["zoom"] * 0.8,
                    L["b"] * half * anat["zoom"] * 0.8,
                )
            )
        lesion_tex = _smooth_noise(size, 24, rng)
        if pattern == "focal":
            specs = [(rng.uniform(0.04, 0.10) * size, rng.uniform(0.28, 0.38), 2.0, None)]
        elif pattern == "lobar":
            specs = [(rng.uniform(0.10, 0.15) * size, rng.uniform(0.22, 0.30), 2.0, None)]
        else:
            n = int(rng.integers(4, 8))
            specs = [(rng.uniform(0.035, 0.06) * size, rng.uniform(0.10, 0.16), 1.0, i % 2) for i in range(n)]
        field = np.zeros_like(u)
        for radius, amp, sharp, side in specs:
            cands = ellipses if side is None else [ellipses[side]]
            placed = _place_disc(lung_hard, rng, radius, cands, need_inside=pattern != "lobar")
            if placed is None:
                placed = _place_disc(lung_hard, rng, radius, ellipses, need_inside=False)
            if placed is None:  # pragma: no cover - a lung field always has pixels
                continue
            x, y, radius = placed
            lesions.append({"x": float(x), "y": float(y), "r": round(float(radius), 2)})
            field += f32(amp) * _lesion_field(size, x, y, radius, sharp, lesion_tex)
        if pattern == "lobar":
            field *= lung  # consolidation stops at the pleura / heart border
        img += field
    mask = lesion_mask(size, lesions) & lung_hard

    # smooth exposure variation, quantum noise, global contrast / brightness / gamma
    img += f32(rng.uniform(0.01, 0.03)) * _smooth_noise(size, 4, rng)
    img += rng.standard_normal((size, size), dtype=np.float32) * f32(rng.uniform(0.005, 0.015))
    contrast, bright, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.06, 0.06), rng.uniform(-0.2, 0.2)
    img = (img - f32(0.35)) * f32(contrast) + f32(0.35 + bright)
    np.clip(img, 0.0, 1.0, out=img)
    img += f32(gamma) * img * (f32(1.0) - img)  # a cheap monotone gamma-like curve
    return img.astype(np.float32, copy=False), {"lesions": lesions, "mask": mask, "lungs": lung_hard}


def phantom(
    size: int,
    rng: np.random.Generator,
    lesion: bool = False,
    pattern: str = "focal",
) -> tuple[np.ndarray, dict[str, Any]]:
    """One synthetic chest X-ray.

    Args:
        size: side in pixels (square image).
        rng: numpy Generator; the image is a deterministic function of its state.
        lesion: add lesion(s) of ``pattern`` inside the lung fields.
        pattern: ``"focal"`` (one blob, r 4-10 % of size), ``"lobar"`` (one large dense
            consolidation) or ``"diffuse"`` (several faint bilateral patches).

    Returns:
        ``(image, info)``: float32 (size, size) image in [0, 1] and
        ``{"lesions": [{"x", "y", "r"}, ...], "mask": bool (size, size), "lungs": bool (size, size)}``
        with lesion centres / radii in pixels (x = column, y = row) and the lesion and lung-field masks.
    """
    if size < 16:
        raise UsageError(f"phantom size must be at least 16 pixels, got {size}")
    return _render(int(size), _sample_anatomy(rng), rng, pattern if lesion else None)


# --------------------------------------------------------------------------------------------------
# datasets


def _class_patterns(classes: Sequence[str]) -> list[str | None]:
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UsageError(f"need at least two distinct classes, got {list(classes)}")
    out = []
    for name in classes:
        key = str(name).upper()
        if key not in CLASS_PATTERNS:
            raise UsageError(f"unknown synthetic class {name!r}; valid classes: {', '.join(CLASS_PATTERNS)}")
        out.append(CLASS_PATTERNS[key])
    return out


def _patients(n_images: int, rng: np.random.Generator) -> list[int]:
    """Split n_images into patients of 1-3 images each."""
    counts = []
    left = n_images
    while left > 0:
        k = min(int(rng.integers(1, 4)), left)
        counts.append(k)
        left -= k
    return counts


def _iter_images(n_per_class: int, size: int, seed: int, classes: Sequence[str]):
    """Yield (class_index, patient_number_within_class, k, image, info) deterministically."""
    patterns = _class_patterns(classes)
    for ci, pattern in enumerate(patterns):
        counts = _patients(n_per_class, np.random.default_rng([seed, ci, 0]))
        for pi, count in enumerate(counts):
            prng = np.random.default_rng([seed, ci, 1, pi])
            anat = _sample_anatomy(prng)
            for k in range(count):
                irng = np.random.default_rng([seed, ci, 2, pi, k])
                img, info = _render(size, _jitter_anatomy(anat, irng) if k else anat, irng, pattern)
                yield ci, pi, k, img, info


def make_arrays(
    n_per_class: int = 100,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = ("NORMAL", "LESION"),
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """In-memory dataset: float32 images (N, size, size), int labels (N,) and per-image info dicts.

    Same images as :func:`write_dataset` with the same arguments (before 8-bit quantisation).
    """
    images, labels, infos = [], [], []
    for ci, _pi, _k, img, info in _iter_images(n_per_class, size, seed, classes):
        images.append(img)
        labels.append(ci)
        infos.append(info)
    return np.stack(images), np.asarray(labels, dtype=np.int64), infos


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 (rounded)."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _fmt(values: list[float]) -> str:
    return ";".join(f"{v:g}" for v in values)


def write_dataset(
    root: str | os.PathLike,
    n_per_class: int = 100,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = ("NORMAL", "LESION"),
    layout: str = "folders",
    val_fraction: float = 0.0,
) -> Path:
    """Write a synthetic dataset of 8-bit greyscale PNGs plus ``root/labels.csv``; returns ``root``.

    Each class gets exactly ``n_per_class`` images from patients with 1-3 images each (ids
    ``synth0001``, ... unique over the whole dataset), files named ``<patient>_<k>.png``.

    Layouts: ``"folders"`` writes ``root/<CLASS>/<patient>_<k>.png``; ``"flat"`` writes
    ``root/images/<patient>_<k>.png`` (labels only in the CSV). With ``val_fraction > 0`` a
    patient-level split is made per class and the files go under ``root/train/...`` and
    ``root/val/...``; the CSV then gets an extra ``split`` column.

    ``labels.csv`` columns: ``path,label,patient_id,lesion_x,lesion_y,lesion_r`` (paths relative to
    the CSV, POSIX separators; lesion fields empty for normal images, ``;``-separated when an image
    has several lesions, see :func:`parse_lesions`). Every file is written atomically; the same
    arguments give byte-identical files.
    """
    from PIL import Image

    from cxrtool.io import atomic_path, write_csv

    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_per_class < 1:
        raise UsageError(f"n_per_class must be at least 1, got {n_per_class}")
    root = Path(root)
    classes = tuple(classes)
    _class_patterns(classes)

    # patient-level validation split, per class, decided up front and deterministically
    val_patients: set[tuple[int, int]] = set()
    if val_fraction > 0:
        for ci in range(len(classes)):
            n_pat = len(_patients(n_per_class, np.random.default_rng([seed, ci, 0])))
            n_val = min(max(int(round(val_fraction * n_pat)), 1), n_pat - 1) if n_pat > 1 else 0
            order = np.random.default_rng([seed, ci, 3]).permutation(n_pat)
            val_patients.update((ci, int(p)) for p in order[:n_val])

    rows: list[dict[str, Any]] = []
    pid_of: dict[tuple[int, int], str] = {}
    for ci, pi, k, img, info in _iter_images(n_per_class, size, seed, classes):
        pid = pid_of.setdefault((ci, pi), f"synth{len(pid_of) + 1:04d}")
        label = classes[ci]
        parts: list[str] = []
        split = "val" if (ci, pi) in val_patients else "train"
        if val_fraction > 0:
            parts.append(split)
        parts.append(label if layout == "folders" else "images")
        rel = "/".join([*parts, f"{pid}_{k}.png"])
        dest = root / rel
        with atomic_path(dest) as tmp:
            Image.fromarray(to_uint8(img)).save(tmp, format="PNG")
        les = info["lesions"]
        row = {
            "path": rel,
            "label": label,
            "patient_id": pid,
            "lesion_x": _fmt([d["x"] for d in les]),
            "lesion_y": _fmt([d["y"] for d in les]),
            "lesion_r": _fmt([d["r"] for d in les]),
        }
        if val_fraction > 0:
            row["split"] = split
        rows.append(row)
    fields = list(MANIFEST_COLUMNS) + (["split"] if val_fraction > 0 else [])
    write_csv(root / "labels.csv", rows, fieldnames=fields)
    return root


def parse_lesions(row: dict[str, str]) -> list[dict[str, float]]:
    """Lesions ``[{"x", "y", "r"}, ...]`` of one ``labels.csv`` row (empty list for normal images)."""
    xs, ys, rs = (str(row.get(k) or "").strip() for k in ("lesion_x", "lesion_y", "lesion_r"))
    if not xs:
        return []
    try:
        return [
            {"x": float(x), "y": float(y), "r": float(r)}
            for x, y, r in zip(xs.split(";"), ys.split(";"), rs.split(";"), strict=True)
        ]
    except ValueError as exc:
        raise DataError(f"malformed lesion fields in manifest row {row.get('path', '?')!r}: {exc}") from exc
