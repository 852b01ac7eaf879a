"""Is an explanation any good? Deletion / insertion curves, the model-randomisation sanity check and the
pointing game on synthetic lesions.

Deletion / insertion (Petsiuk et al. 2018, RISE)
    Pixels are ranked by attribution (most positive first; ties keep image order). Deletion replaces the
    top fraction with black (pixel value 0), insertion starts from the blurred image and puts the top
    fraction of original pixels back; the target's softmax probability is recorded at ``steps + 1``
    evenly spaced fractions and the area under each curve (trapezoid over the fraction 0..1) reported.
    Good maps give a low deletion AUC and a high insertion AUC. The same curves for a random ranking
    (seeded) are the baseline every method should beat.
Model randomisation (Adebayo et al. 2018, Sanity Checks for Saliency Maps)
    The weights of the last layers (the classifier head and the deepest explainable block; both stages
    of a cascade) are re-initialised (seeded) and the image explained again; the Spearman rank
    correlation between the original and the new map is reported (raw and of absolute values). A
    faithful method changes a lot: correlation near 0. A method that returns the same picture whatever
    the weights (an edge detector) stays near 1.
Pointing game (Zhang et al. 2016)
    On images with known lesions (the synthetic phantoms' ``labels.csv``), a hit when the map's maximum
    lies inside a lesion disc (plus ``tolerance`` pixels). Chance level: the share of the image covered
    by the lesions, reported alongside.

Spearman's rho is computed with numpy only (average ranks for ties).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cxrtool.explain import ExplainContext, Explainer
    from cxrtool.imaging import Preprocessing


# -- rank correlation ------------------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two maps, ties averaged (None when either map is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


# -- deletion / insertion ------------------------------------------------------------------------------
def _probs(model, x: torch.Tensor, target: int, batch: int) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(torch.softmax(model(x[s : s + batch]), dim=1)[:, target].double().numpy())
    return np.concatenate(out)


def curve_order(amap: np.ndarray) -> np.ndarray:
    """Pixel indices, most positive attribution first (stable)."""
    return np.argsort(-np.asarray(amap, dtype=np.float64).ravel(), kind="stable")


def deletion_insertion(model, x: torch.Tensor, target: int, order: np.ndarray, pp: Preprocessing, *,
                       steps: int = 32, batch: int = 33) -> dict[str, Any]:
    """Deletion and insertion curves for one image ``x`` (1, 1, H, W) and a pixel ``order``."""
    import torch

    from cxrtool.explain import reference

    h, w = x.shape[-2:]
    n = h * w
    ks = np.unique(np.round(np.linspace(0, n, steps + 1)).astype(np.int64))
    rank = np.empty(n, np.int64)
    rank[np.asarray(order)] = np.arange(n)
    rank_t = torch.from_numpy(rank.reshape(h, w))
    masks = torch.stack([rank_t < int(k) for k in ks])[:, None]  # (S, 1, H, W)
    black = reference(x, "black", pp)
    blurred = reference(x, "blur", pp)
    deleted = torch.where(masks, black, x)
    inserted = torch.where(masks, x, blurred)
    d = _probs(model, deleted, target, batch)
    i = _probs(model, inserted, target, batch)
    frac = ks / n
    return {"fractions": frac.tolist(), "deletion": d.tolist(), "insertion": i.tolist(),
            "deletion_auc": float(np.trapezoid(d, frac)), "insertion_auc": float(np.trapezoid(i, frac))}


def random_order(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(h * w)


# -- model randomisation ---------------------------------------------------------------------------------
def randomisation_layers(meta: dict[str, Any], model) -> list[str]:
    """The head(s) and the deepest explainable block(s) of the checkpoint's model."""
    from cxrtool.explain import explainable_layers, head_layers

    names = {n for n, _ in model.named_modules() if n}
    layers = [h for h in head_layers(meta) if h in names]
    expl = explainable_layers(meta)
    if meta.get("cascade"):
        for stage in ("stage1.", "stage2."):
            deep = [e for e in expl if e.startswith(stage)]
            if deep:
                layers.append(deep[-1])
    elif expl:
        layers.append(expl[-1])
    layers = [n for n in layers if n in names]
    if not layers:  # unknown model: the last module with parameters
        with_params = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))]
        layers = with_params[-1:]
    return list(dict.fromkeys(layers))


def randomized_copy(model, layers: list[str], seed: int):
    """A copy of ``model`` whose ``layers`` are re-initialised (``reset_parameters``), seeded."""
    import torch

    out = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name in layers:
            for module in out.get_submodule(name).modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                    if getattr(module, "running_var", None) is not None:  # BN: random statistics too
                        module.running_mean.normal_(0, 0.1)
                        module.running_var.uniform_(0.5, 1.5)
                        if getattr(module, "weight", None) is not None:
                            module.weight.data.uniform_(0.5, 1.5)
    return out.eval()


def randomisation_check(explainer: Explainer, ctx: ExplainContext, x: torch.Tensor, target: torch.Tensor,
                        amap: np.ndarray, layers: list[str]) -> dict[str, Any]:
    """Re-explain ``x`` with ``layers`` randomised; rank correlations with the original ``amap``."""
    model2 = randomized_copy(ctx.model, layers, ctx.seed + 1)
    other = explainer.attribute(x, target, replace(ctx, model=model2, progress=None)).maps[0]
    return {"layers": layers, "spearman": spearman(amap, other), "spearman_abs": spearman(np.abs(amap), np.abs(other))}


# -- pointing game ----------------------------------------------------------------------------------------
def lesions_to_input(lesions: list[dict[str, float]], shape: tuple[int, int], pp: Preprocessing) -> list[dict[str, float]]:
    """Lesion discs from original-image pixels to model-input pixels (pixel centres)."""
    from cxrtool.imaging import geometry

    g = geometry(shape, pp)
    out = []
    for les in lesions:
        out.append({"x": (les["x"] + 0.5) * g["scale_x"] - 0.5 + g["offset_x"],
                    "y": (les["y"] + 0.5) * g["scale_y"] - 0.5 + g["offset_y"],
                    "r": les["r"] * 0.5 * (g["scale_x"] + g["scale_y"])})
    return out


def pointing_hit(amap: np.ndarray, lesions: list[dict[str, float]], tolerance: float = 0.0) -> bool:
    """Whether the map's maximum lies in one of the lesion discs (input pixels), within ``tolerance``."""
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    return any((px - les["x"]) ** 2 + (py - les["y"]) ** 2 <= (les["r"] + tolerance) ** 2 for les in lesions)


def lesion_fraction(shape: tuple[int, int], lesions: list[dict[str, float]], tolerance: float = 0.0) -> float:
    """Share of the image's pixels inside the (tolerance-grown) discs: the pointing game's chance level."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.zeros((h, w), bool)
    for les in lesions:
        inside |= (xx - les["x"]) ** 2 + (yy - les["y"]) ** 2 <= (les["r"] + tolerance) ** 2
    return float(inside.mean())


# -- one image, all metrics ----------------------------------------------------------------------------------
def evaluate_map(explainer: Explainer, ctx: ExplainContext, x: torch.Tensor, target: torch.Tensor,
                 amap: np.ndarray, *, steps: int = 32, randomise: bool = True,
                 lesions: list[dict[str, float]] | None = None, tolerance: float = 0.0) -> dict[str, Any]:
    """Deletion / insertion AUCs, randomisation correlation and (with ``lesions``) the pointing game."""
    from cxrtool.explain import activation_bytes, batch_for_memory

    batch = batch_for_memory(activation_bytes(ctx.model, x), ctx.memory_mb, steps + 1)
    cur = deletion_insertion(ctx.model, x, int(target[0]), curve_order(amap), ctx.preprocessing, steps=steps, batch=batch)
    out: dict[str, Any] = {"deletion_auc": cur["deletion_auc"], "insertion_auc": cur["insertion_auc"], "curves": cur}
    if randomise:
        out["randomisation"] = randomisation_check(explainer, ctx, x, target, amap,
                                                   randomisation_layers(ctx.meta, ctx.model))
    if lesions:
        out["pointing_hit"] = pointing_hit(amap, lesions, tolerance)
    return out


def random_baseline(ctx: ExplainContext, x: torch.Tensor, target: int, *, steps: int = 32, seed: int = 0) -> dict[str, Any]:
    from cxrtool.explain import activation_bytes, batch_for_memory

    batch = batch_for_memory(activation_bytes(ctx.model, x), ctx.memory_mb, steps + 1)
    h, w = x.shape[-2:]
    return deletion_insertion(ctx.model, x, target, random_order(h, w, seed), ctx.preprocessing, steps=steps, batch=batch)


def summarise(values: list[float | None]) -> dict[str, Any]:
    vals = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not len(vals):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "n": int(len(vals))}


def evaluate_images(
    images: list[dict[str, Any]],
    explainers: dict[str, Explainer],
    ctx: ExplainContext,
    *,
    target: int | None = None,
    steps: int = 32,
    randomise: bool = True,
    tolerance: float = 0.0,
    negative_index: int | None = None,
    threshold: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate each method on ``images`` (``{"path", "x" (1,1,H,W), "shape", "lesions" (input px) or None}``).

    The target is ``target`` or each image's predicted class (as ``cxrtool predict`` decides: argmax, or
    the operating point ``threshold`` on the abnormality score when given). Returns per-method summaries
    (mean, std, n of each metric), the same split by explained class, the random-map baseline and
    per-image rows.
    """
    import time

    import torch

    from cxrtool.explain import predict_probs
    from cxrtool.metrics import decide

    rows: list[dict[str, Any]] = []
    per: dict[str, dict[str, list]] = {m: {"deletion_auc": [], "insertion_auc": [], "spearman": [], "spearman_abs": [],
                                           "pointing": [], "seconds": []} for m in explainers}
    rnd = {"deletion_auc": [], "insertion_auc": [], "chance": []}
    for k, item in enumerate(images):
        x = item["x"]
        probs = predict_probs(ctx.model, x)[0]
        t = int(target if target is not None else decide(probs[None].numpy(), negative_index, threshold)[0])
        tt = torch.tensor([t])
        row: dict[str, Any] = {"path": item["path"], "target": ctx.class_names[t], "probability": float(probs[t]),
                               "methods": {}}
        base = random_baseline(ctx, x, t, steps=steps, seed=ctx.seed + k)
        rnd["deletion_auc"].append(base["deletion_auc"])
        rnd["insertion_auc"].append(base["insertion_auc"])
        row["random"] = {"deletion_auc": base["deletion_auc"], "insertion_auc": base["insertion_auc"]}
        lesions = item.get("lesions")
        if lesions:
            rnd["chance"].append(lesion_fraction(tuple(x.shape[-2:]), lesions, tolerance))
        for name, explainer in explainers.items():
            c = replace(ctx, original_shape=item.get("shape"), progress=None)
            t0 = time.perf_counter()
            amap = explainer.attribute(x, tt, c).maps[0]
            seconds = time.perf_counter() - t0
            ev = evaluate_map(explainer, c, x, tt, amap, steps=steps, randomise=randomise, lesions=lesions,
                              tolerance=tolerance)
            per[name]["deletion_auc"].append(ev["deletion_auc"])
            per[name]["insertion_auc"].append(ev["insertion_auc"])
            per[name]["seconds"].append(seconds)
            if "randomisation" in ev:
                per[name]["spearman"].append(ev["randomisation"]["spearman"])
                per[name]["spearman_abs"].append(ev["randomisation"]["spearman_abs"])
            if "pointing_hit" in ev:
                per[name]["pointing"].append(float(ev["pointing_hit"]))
            row["methods"][name] = {k2: v for k2, v in ev.items() if k2 != "curves"}
        rows.append(row)
        if progress:
            progress(1)
    methods = {}
    for name, vals in per.items():
        methods[name] = {
            "deletion_auc": summarise(vals["deletion_auc"]),
            "insertion_auc": summarise(vals["insertion_auc"]),
            "randomisation_spearman": summarise(vals["spearman"]),
            "randomisation_spearman_abs": summarise(vals["spearman_abs"]),
            "pointing_game": summarise(vals["pointing"]),
            "seconds_per_image": summarise(vals["seconds"]),
            "options": dict(explainers[name].options),
        }
    by_target: dict[str, Any] = {}
    for cls in sorted({r["target"] for r in rows}):
        sub = [r for r in rows if r["target"] == cls]
        by_target[cls] = {
            "n_images": len(sub),
            "random_map": {k: summarise([r["random"][k] for r in sub]) for k in ("deletion_auc", "insertion_auc")},
            "methods": {m: {k: summarise([r["methods"][m][k] for r in sub]) for k in ("deletion_auc", "insertion_auc")}
                        for m in explainers},
        }
    return {
        "n_images": len(images),
        "by_target": by_target,
        "steps": steps,
        "tolerance_px": tolerance,
        "methods": methods,
        "random_map": {"deletion_auc": summarise(rnd["deletion_auc"]), "insertion_auc": summarise(rnd["insertion_auc"]),
                       "pointing_chance": summarise(rnd["chance"])},
        "images": rows,
    }
