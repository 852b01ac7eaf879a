"""Explainers: the spec plugins register and the base class every method implements.

Three kinds of method (``Explainer.kind``):

``attribution``
    a map per input image (occlusion, Integrated Gradients, Grad-CAM): implement :meth:`attribute`.
``dataset``
    looks over a set of images (receptive fields of the most activating units): implement
    :meth:`run_dataset`.
``synthesis``
    makes inputs (activation maximisation), optionally starting from an image: implement
    :meth:`synthesize`.

Shared validation of options lives in the base class; the CLI (``cxrtool explain``) turns results
into overlays, ``.npy`` maps, manifests and contact sheets.

Beyond the contract this module holds what every method and the CLI share: layer names of a
checkpoint's model (cascade-aware), target-class resolution, reference images (black / mean /
blurred) used as occlusion fills and Integrated-Gradients baselines, a memory-based batch size, and
the rendering of overlays and contact sheets. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrtool import registry
from cxrtool.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from cxrtool.data import ImageSet
    from cxrtool.imaging import Preprocessing

KINDS = ("attribution", "dataset", "synthesis")


@dataclass(frozen=True)
class ExplainerSpec:
    """A named explanation method. ``build(**options)`` returns an :class:`Explainer`."""

    name: str
    build: Callable[..., Explainer]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = "attribution"
    reference: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "options": dict(self.options),
                "kind": self.kind, "reference": self.reference}


@dataclass
class ExplainContext:
    """What every method may use: the model (eval mode), how inputs were made, where to report."""

    model: Any  # torch.nn.Module returning logits (N, C)
    preprocessing: Preprocessing
    class_names: list[str]
    layer: str | None = None  # dotted module name chosen with --layer (None: the method's default)
    default_layer: str | None = None  # the model's last explainable layer
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    progress: Callable[[int], None] | None = None
    #: (height, width) of the original image(s) of the current ``attribute`` call, when known; methods
    #: whose options are in original-image pixels (occlusion patch / stride) convert with it
    original_shape: tuple[int, int] | None = None
    #: rough upper bound for the memory one batch of perturbed / interpolated inputs may take
    memory_mb: int = 1024
    #: the checkpoint metadata (model name, explainable layers, cascade, ...) when known
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target_layer(self) -> str | None:
        """``layer`` if one was chosen, else the model's default explainable layer."""
        return self.layer or self.default_layer


@dataclass
class Attribution:
    """Maps for a batch: ``maps`` float32 (N, H, W) at model-input resolution, plus per-image extras
    (e.g. ``{"delta": [...]}`` for Integrated Gradients) that go into the manifest."""

    maps: np.ndarray
    extras: dict[str, list] = field(default_factory=dict)


class Explainer:
    """Base class. Subclasses set ``name``/``kind`` and implement the method for their kind.

    Attribution methods may also set ``signed`` (maps have meaningful negative values; rendered on a
    symmetric diverging scale), ``unit`` (what the map values measure, for the colour bar) and
    ``display_percentile`` (renderings saturate above this percentile of |value|; 100: the maximum).
    """

    name = "base"
    kind = "attribution"
    signed = True
    unit = "attribution"
    display_percentile = 100.0

    def __init__(self, **options: Any) -> None:
        self.options = options

    def attribute(self, x: torch.Tensor, target: torch.Tensor, ctx: ExplainContext) -> Attribution:
        """x: (N, 1, H, W) normalised model input; target: (N,) class indices."""
        raise NotImplementedError

    def run_dataset(self, ds: ImageSet, ctx: ExplainContext, out_dir: Path) -> dict[str, Any]:
        """Look over ``ds``; write PNGs into ``out_dir``; return a JSON-ready summary."""
        raise NotImplementedError

    def synthesize(self, targets: list[Any], ctx: ExplainContext, out_dir: Path,
                   start: torch.Tensor | None = None) -> dict[str, Any]:
        """Make one input per target; write PNGs into ``out_dir``; return a JSON-ready summary."""
        raise NotImplementedError


def build_explainer(name: str, options: dict[str, Any]) -> Explainer:
    """The explainer ``name`` with ``options`` merged over its defaults (unknown options: UsageError)."""
    spec: ExplainerSpec = registry.get("explainer", name)
    unknown = set(options) - set(spec.options)
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in spec.options.items()) or "(none)"
        raise UsageError(f"explainer {name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return spec.build(**{**spec.options, **options})


# -- option helpers for plugins --------------------------------------------------------------------
def choice_option(method: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise UsageError(f"{method}: option {name}={value!r} must be one of {', '.join(choices)}")
    return text


def int_option(method: str, name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"{method}: option {name}={value!r} is not an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{method}: option {name}={value!r} is not an integer") from None
    if number < low:
        raise UsageError(f"{method}: option {name}={value!r} must be >= {low}")
    return number


def float_option(method: str, name: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{method}: option {name}={value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{method}: option {name}={value!r} is not a number") from None
    if not (low <= number <= high) or not math.isfinite(number):
        raise UsageError(f"{method}: option {name}={value!r} must be between {low} and {high}")
    return number


def parse_option_value(text: str) -> Any:
    """``KEY=VALUE`` values from the command line: JSON numbers / true / false / null, else the text."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


# -- layers of a checkpoint's model -------------------------------------------------------------------
def explainable_layers(meta: dict[str, Any]) -> list[str]:
    """The checkpoint's explainable layers, shallow to deep; a cascade lists ``stage1.X`` then ``stage2.X``."""
    layers = list(meta.get("explainable_layers") or [])
    if not layers:
        name = (meta.get("model") or {}).get("name")
        if name:
            try:
                layers = list(registry.get("model", name).explainable_layers)
            except UsageError:
                layers = []
    if meta.get("cascade"):
        return [f"stage1.{n}" for n in layers] + [f"stage2.{n}" for n in layers]
    return layers


def default_layer(meta: dict[str, Any]) -> str | None:
    """The deepest explainable layer (for a cascade: stage 1's, the normal-vs-abnormal decision)."""
    layers = list(meta.get("explainable_layers") or explainable_layers({**meta, "cascade": None}))
    if not layers:
        return None
    return f"stage1.{layers[-1]}" if meta.get("cascade") else layers[-1]


def head_layers(meta: dict[str, Any]) -> list[str]:
    """The classifier head module(s) of the checkpoint's model (cascade: one per stage)."""
    name = (meta.get("model") or {}).get("name")
    try:
        head = registry.get("model", name).head if name else None
    except UsageError:
        head = None
    if not head:
        return []
    return [f"stage1.{head}", f"stage2.{head}"] if meta.get("cascade") else [head]


def resolve_layer(model: Any, name: str | None, meta: dict[str, Any] | None = None) -> str | None:
    """``name`` if it is a module of ``model`` (None stays None); else a UsageError listing layers."""
    if name is None:
        return None
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return name
    suggested = explainable_layers(meta or {}) or names
    raise UsageError(
        f"unknown layer {name!r}; explainable layers: {', '.join(suggested)} "
        f"(all {len(names)} addressable layers: `cxrtool layers`)"
    )


def resolve_target(class_names: list[str], target: str | None) -> int | None:
    """Class index of ``target`` (case-insensitive name, or ``#index``); None stays None."""
    if target is None:
        return None
    text = str(target).strip()
    for i, n in enumerate(class_names):
        if n == text:
            return i
    lowered = [n.lower() for n in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.startswith("#") and text[1:].isdigit() and int(text[1:]) < len(class_names):
        return int(text[1:])
    raise UsageError(f"the model has no class {target!r}; valid classes: {', '.join(class_names)}")


def make_context(ckpt: Any, *, layer: str | None = None, seed: int = 0, batch_size: int = 64,
                 memory_mb: int = 1024, progress: Callable[[int], None] | None = None) -> ExplainContext:
    """An :class:`ExplainContext` for a loaded checkpoint, ``layer`` validated."""
    meta = dict(ckpt.meta)
    return ExplainContext(
        model=ckpt.model, preprocessing=ckpt.preprocessing, class_names=ckpt.class_names,
        layer=resolve_layer(ckpt.model, layer, meta), default_layer=default_layer(meta), seed=seed,
        batch_size=batch_size, progress=progress, memory_mb=memory_mb, meta=meta,
    )


# -- reference images: occlusion fills, IG baselines, deletion / insertion canvases ---------------------
REFERENCES = ("zero", "black", "mean", "blur")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflected borders (sigma in pixels)."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return x.clone()
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def blur_sigma(size: int) -> float:
    """The default blur for ``blur`` references: 1/20 of the input size (11 px at 224 px)."""
    return max(1.0, size / 20.0)


def reference(x: torch.Tensor, kind: str, pp: Preprocessing, sigma: float | None = None) -> torch.Tensor:
    """A reference image for each input of ``x`` (N, 1, H, W), in model-input units.

    ``zero`` / ``black``: pixel value 0 (air); ``mean``: each image's mean intensity everywhere;
    ``blur``: the image blurred with a Gaussian (``sigma`` pixels, default :func:`blur_sigma`).
    """
    import torch

    if kind in ("zero", "black"):
        return torch.full_like(x, (0.0 - pp.mean) / pp.std)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        return gaussian_blur(x, blur_sigma(x.shape[-1]) if sigma is None else sigma)
    raise UsageError(f"unknown reference {kind!r}; valid: {', '.join(REFERENCES)}")


def batch_for_memory(per_item_bytes: float, memory_mb: int, cap: int) -> int:
    """How many items fit in ``memory_mb`` (at least 1, at most ``cap``)."""
    if per_item_bytes <= 0:
        return max(1, cap)
    return int(max(1, min(cap, (memory_mb * 2**20) // per_item_bytes)))


def activation_bytes(model: Any, x: torch.Tensor) -> int:
    """Bytes of every leaf module's output for one forward pass of ``x`` (a single image): an upper bound
    of what a perturbed forward keeps alive per image (backward keeps about this much too)."""
    import torch

    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(total[0], x[:1].numel() * x.element_size())


def predict_probs(model: Any, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Softmax probabilities (N, C) in batches, without gradients."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            out.append(torch.softmax(model(x[s : s + batch_size]), dim=1))
    return torch.cat(out)


def probability_model(model: Any):
    """``softmax(model(x), dim=1)`` as an ``nn.Module`` in eval mode (what occlusion and the deletion /
    insertion curves measure)."""
    import torch

    class ProbabilityModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.softmax(self.inner(x), dim=1)

    return ProbabilityModel(model).eval()


# -- rendering ------------------------------------------------------------------------------------------
def map_scale(maps: list[np.ndarray], signed: bool, percentile: float = 100.0) -> tuple[float, float]:
    """(vmin, vmax) covering ``maps``: symmetric about 0 for signed maps, from 0 otherwise. With
    ``percentile`` < 100 the scale ends at that percentile of the absolute values (pixel-level maps such as
    Integrated Gradients are heavy-tailed; the few brighter pixels saturate)."""
    import numpy as np

    values = [np.abs(m).ravel() for m in maps if m.size]
    if not values:
        peak = 0.0
    elif percentile >= 100:
        peak = max(float(np.nanmax(v)) for v in values)
    else:
        peak = float(np.nanpercentile(np.concatenate(values), percentile))
    peak = peak if peak > 0 else 1e-12
    return (-peak, peak) if signed else (0.0, peak)


def scale_note(mode: str, n_images: int, percentile: float) -> str:
    """How a rendering is scaled, in words (goes next to the colour bar)."""
    what = "max |value|" if percentile >= 100 else f"{percentile:g}th percentile of |value|"
    if mode == "shared":
        return f"shared scale: {what} over {n_images} image(s)"
    return f"scaled to this map's {what}"


def _overlay_rgba(amap: np.ndarray, vmin: float, vmax: float, signed: bool):
    import matplotlib
    import numpy as np

    cmap = matplotlib.colormaps["RdBu_r" if signed else "inferno"]
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    rgba = cmap(norm(amap))
    strength = np.abs(amap) / max(abs(vmin), abs(vmax), 1e-12) if signed else (amap - vmin) / max(vmax - vmin, 1e-12)
    rgba[..., 3] = 0.7 * np.nan_to_num(np.clip(strength, 0.0, 1.0), nan=0.0) ** 0.75  # NaN: no map there
    return rgba, cmap, norm


def _short(name: str, n: int = 38) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def render_overlay(path: str | Path, image: np.ndarray, amap: np.ndarray, *, title: str, subtitle: str,
                   vmin: float, vmax: float, signed: bool, unit: str, scale_note: str) -> Path:
    """The X-ray (grey; the original or the model input) with the map of the same shape on top, a colour
    bar labelled with ``unit`` and how it is scaled; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from cxrtool.io import save_figure

    fig, ax = plt.subplots(figsize=(5.4, 5.0))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    rgba, cmap, norm = _overlay_rgba(amap, vmin, vmax, signed)
    ax.imshow(rgba, interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(f"{title}\n{subtitle}", fontsize=9)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(f"{unit}\n({scale_note})", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return save_figure(fig, path, dpi=110)


def render_contact_sheet(path: str | Path, rows: list[dict[str, Any]], methods: list[str],
                         scales: dict[str, dict[str, Any]], title: str) -> Path:
    """One PNG: a row per image (the X-ray, then its overlay for each method).

    ``rows``: ``{"name", "image" (uint8), "label" (prediction text), "maps": {method: array}}``;
    ``scales``: per method ``{"mode", "signed", "unit", "percentile", "vmin", "vmax"}`` (``vmin``/``vmax``
    only for a shared scale, which also gets a colour bar under its column; per-image scales are
    recomputed here and each cell says its maximum).
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from cxrtool.io import save_figure

    ncol, nrow = 1 + len(methods), len(rows)
    cell, header = 2.3, 0.75 + 0.16 * len(methods)
    shared = any(scales[m]["mode"] == "shared" for m in methods)
    footer = 0.75 if shared else 0.1
    height = cell * nrow + header + footer
    fig, axes = plt.subplots(nrow, ncol, figsize=(cell * ncol, height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - header / height, bottom=footer / height,
                        hspace=0.28, wspace=0.04)
    for r, row in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(row["image"], cmap="gray", vmin=0, vmax=255)
        ax.set_title(_short(row["name"], 30) + "\n" + row["label"], fontsize=7)
        ax.set_axis_off()
        for c, method in enumerate(methods, start=1):
            ax = axes[r][c]
            ax.set_axis_off()
            amap = row["maps"].get(method)
            if amap is None:
                continue
            sc = scales[method]
            pct = sc.get("percentile", 100.0)
            vmin, vmax = (sc["vmin"], sc["vmax"]) if sc["mode"] == "shared" else map_scale([amap], sc["signed"], pct)
            ax.imshow(row["image"], cmap="gray", vmin=0, vmax=255)
            rgba, _, _ = _overlay_rgba(amap, vmin, vmax, sc["signed"])
            ax.imshow(rgba)
            if r == 0:
                ax.set_title(method + "\n", fontsize=8, fontweight="bold")
            if sc["mode"] != "shared":
                ax.text(0.02, 0.02, f"scale {max(abs(vmin), abs(vmax)):.3g}", transform=ax.transAxes, fontsize=6,
                        color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    for c, method in enumerate(methods, start=1):
        sc = scales[method]
        if sc["mode"] == "shared":
            _, cmap, norm = _overlay_rgba(np.zeros((1, 1)), sc["vmin"], sc["vmax"], sc["signed"])
            pos = axes[-1][c].get_position()
            cax = fig.add_axes((pos.x0 + 0.08 * pos.width, 0.4 / height, 0.84 * pos.width, 0.1 / height))
            bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
            bar.ax.tick_params(labelsize=6)
    notes = []
    for method in methods:
        sc = scales[method]
        colours = "red +, blue −" if sc["signed"] else "bright = high"
        notes.append(f"{method}: {sc['unit']}, {colours}; "
                     f"{scale_note(sc['mode'], sc.get('n_images', nrow), sc.get('percentile', 100.0))}")
    fig.suptitle(title + "\n" + "\n".join(notes), fontsize=8, y=1 - 0.08 / height)
    return save_figure(fig, path, dpi=100)
