"""Figures and tables for training and evaluation reports (matplotlib, Agg backend; no torch).

Every function writes its file atomically through :mod:`cxrtool.io` (a temporary file renamed
into place), so an interrupted run never leaves a half-written PNG or CSV behind.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.errors import DataError
from cxrtool.io import save_figure, write_csv
from cxrtool.metrics import _as_probs, _check_negative_index

DPI = 120
#: first header cell of the confusion-matrix CSV (rows are true classes, columns predicted ones)
CONFUSION_CORNER = "true\\pred"

_PRETTY = {
    "loss": "loss",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "auroc": "AUROC",
    "f1": "F1",
    "macro_f1": "macro F1",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "lr": "learning rate",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pretty(key: str) -> str:
    """``"val_auroc"`` -> ``"val AUROC"``."""
    for prefix in ("train_", "val_", "test_"):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return f"{prefix[:-1]} {_PRETTY.get(rest, rest.replace('_', ' '))}"
    return _PRETTY.get(key, key.replace("_", " "))


def _number(value: Any) -> float:
    """A plottable float (NaN for missing / non-numeric values, which leaves a gap)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _labels(y_true: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if y.size != n:
        raise DataError(f"{y.size} labels but {n} rows of probabilities")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(f"labels must be in 0..{n_classes - 1}")
    return y


# ------------------------------------------------------------------------------ training curves


def plot_training_curves(history: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot loss, metric and learning-rate curves per epoch into one PNG.

    ``history`` rows look like ``{"epoch": 1, "train_loss": .., "val_loss": .., "val_accuracy": ..,
    "val_auroc": .., "lr": .., "best": True}``. Panels: losses (keys ending in ``loss``), other
    ``train_*``/``val_*`` metrics with values in [0, 1], and ``lr`` (each only when present). The
    last row with a truthy ``"best"`` is marked on every panel. Missing values leave gaps.
    """
    if not history:
        raise DataError("no training history to plot")
    plt = _pyplot()

    epochs = np.array([_number(row.get("epoch", i + 1)) for i, row in enumerate(history)])
    keys: list[str] = []
    for row in history:
        for key, value in row.items():
            if key in ("epoch", "best") or key in keys:
                continue
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                keys.append(key)
    series = {k: np.array([_number(row.get(k)) for row in history]) for k in keys}
    loss_keys = [k for k in keys if k.endswith("loss")]
    lr_keys = [k for k in keys if k == "lr" or k.endswith("_lr")]
    # metrics: train_*/val_* values that are rates in [0, 1] (accuracy, AUROC, F1, ...); this
    # leaves out things on other scales such as "train_time_s" or "val_images"
    metric_keys = []
    for k in keys:
        finite = series[k][np.isfinite(series[k])]
        if (k not in loss_keys and k not in lr_keys and k.startswith(("train_", "val_"))
                and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0):
            metric_keys.append(k)
    panels = [(p, ks) for p, ks in (("Loss", loss_keys), ("Metrics", metric_keys),
                                    ("Learning rate", lr_keys)) if ks]
    if not panels:
        raise DataError("training history has no loss, metric or learning-rate values to plot")

    best_rows = [i for i, row in enumerate(history) if row.get("best")]
    best = best_rows[-1] if best_rows else None
    markers = len(history) <= 40

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (panel, ks) in zip(axes[0], panels):
        for k in ks:
            style = "--" if k.startswith("train_") else "-"
            ax.plot(epochs, series[k], style, marker="o" if markers else None, markersize=3.5,
                    linewidth=1.8, label=_pretty(k))
        if panel == "Learning rate":
            values = series[ks[0]]
            finite = values[np.isfinite(values)]
            if finite.size and np.all(finite > 0) and finite.max() / finite.min() > 20:
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if best is not None and math.isfinite(epochs[best]):
            ax.axvline(epochs[best], color="0.35", linestyle=":", linewidth=1.3,
                       label=f"best (epoch {epochs[best]:g})")
            for line in ax.get_lines()[: len(ks)]:
                y = line.get_ydata()[best]
                if math.isfinite(y):
                    ax.plot(epochs[best], y, marker="*", markersize=12, color=line.get_color(),
                            markeredgecolor="black", markeredgewidth=0.6, zorder=5)
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.set_ylabel({"Loss": "loss", "Metrics": "value", "Learning rate": "learning rate"}[panel])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8.5, loc="best", framealpha=0.85)
        if np.all(np.isfinite(epochs)) and len(epochs) <= 15:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title, fontsize=12.5)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI)


# ----------------------------------------------------------------------------- confusion matrix


def _confusion(cm: Any, class_names: list[str]) -> np.ndarray:
    arr = np.asarray(cm)
    n = len(class_names)
    if arr.shape != (n, n):
        raise DataError(f"confusion matrix has shape {arr.shape}, expected ({n}, {n}) for {n} classes")
    return arr.astype(np.int64)


def write_confusion_csv(cm: Any, class_names: list[str], path: str | os.PathLike) -> Path:
    """Write the confusion matrix as CSV: first column ``true\\pred`` with the true class, then one
    column of counts per predicted class."""
    names = [str(c) for c in class_names]
    arr = _confusion(cm, names)
    header = [CONFUSION_CORNER, *names]
    rows = [{CONFUSION_CORNER: name, **{p: int(arr[i, j]) for j, p in enumerate(names)}}
            for i, name in enumerate(names)]
    return write_csv(path, rows, fieldnames=header)


def plot_confusion_matrix(
    cm: Any, class_names: list[str], path: str | os.PathLike, title: str = "Confusion matrix"
) -> Path:
    """Plot the confusion matrix: colour = share of the true class (row-normalised), each cell
    annotated with its count and that percentage."""
    plt = _pyplot()
    names = [str(c) for c in class_names]
    arr = _confusion(cm, names)
    n = len(names)
    row_sums = arr.sum(axis=1, keepdims=True)
    frac = np.divide(arr, row_sums, out=np.zeros(arr.shape, dtype=float), where=row_sums > 0)

    side = max(4.2, 1.1 * n + 2.4)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("share of the true class")
    fontsize = 11 if n <= 5 else 9 if n <= 10 else 7
    for i in range(n):
        for j in range(n):
            if arr[i, j] == 0:  # keep empty cells quiet so the errors that do happen stand out
                ax.text(j, i, "0", ha="center", va="center", fontsize=fontsize, color="0.6")
                continue
            ax.text(j, i, f"{arr[i, j]}\n{100 * frac[i, j]:.1f}%", ha="center", va="center",
                    fontsize=fontsize, color="white" if frac[i, j] > 0.55 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    long = max((len(c) for c in names), default=0) > 8 and n > 2
    ax.set_xticklabels(names, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_yticklabels([f"{c}\n(n={int(row_sums[i, 0])})" for i, c in enumerate(names)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\n(n = {int(arr.sum())})" if title else f"n = {int(arr.sum())}")
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI)


# ------------------------------------------------------------------------------------------ ROC


def _roc_axes(ax) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.grid(True, alpha=0.3)


def _checked(y_true: Any, probs: Any, class_names: list[str], negative_index: int | None):
    """(probabilities (N, C), labels (N,), class names, negative index), checked against each other."""
    probs = _as_probs(probs)
    n, n_classes = probs.shape
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise DataError(f"{len(names)} class names but probabilities have {n_classes} columns")
    return probs, _labels(y_true, n, n_classes), names, _check_negative_index(negative_index, n_classes)


def _curve(ax, is_pos: np.ndarray, score: np.ndarray, label: str, **style) -> bool:
    """Draw one ROC curve; ``False`` (nothing drawn) when only one group is present."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if is_pos.all() or not is_pos.any():
        return False
    fpr, tpr, _ = roc_curve(is_pos, score)
    auc = roc_auc_score(is_pos, score)
    ax.plot(fpr, tpr, label=f"{label} (AUROC = {auc:.3f})", **style)
    return True


def plot_roc(
    y_true: Any,
    probs: Any,
    class_names: list[str],
    path: str | os.PathLike,
    negative_index: int | None = None,
    operating_point: dict | None = None,
    title: str | None = None,
) -> Path:
    """Plot ROC curves.

    Two classes: one curve for the positive class (the class that is not ``negative_index``; class
    1 by default). More classes: one one-vs-rest curve per class, plus, with ``negative_index``, a
    bold "any abnormal vs <negative>" curve of the abnormality score. ``operating_point``
    (``{"sensitivity", "specificity", "threshold"}``, e.g. from
    :func:`cxrtool.metrics.choose_threshold`) is marked with a labelled dot.
    Classes absent from ``y_true`` get no curve (noted in the legend).
    """
    plt = _pyplot()
    probs, y, names, neg = _checked(y_true, probs, class_names, negative_index)
    n, n_classes = probs.shape

    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    _roc_axes(ax)
    drawn = False
    if n_classes == 2:
        neg2 = 0 if neg is None else neg
        pos = 1 - neg2
        drawn = _curve(ax, y == pos, probs[:, pos], f"{names[pos]} vs {names[neg2]}",
                       color="C0", linewidth=2.2)
    else:
        for i, name in enumerate(names):
            ok = _curve(ax, y == i, probs[:, i], f"{name} vs rest", color=f"C{i % 10}", linewidth=1.6,
                        alpha=0.9)
            if not ok:
                ax.plot([], [], color=f"C{i % 10}", label=f"{name}: no curve (not in both groups)")
            drawn |= ok
        if neg is not None:
            drawn |= _curve(ax, y != neg, 1.0 - probs[:, neg], f"any abnormal vs {names[neg]}",
                            color="black", linewidth=2.6)
    if not drawn:
        ax.text(0.5, 0.55, "ROC undefined:\nonly one class present", ha="center", va="center",
                fontsize=12, color="0.3", transform=ax.transAxes)

    if operating_point:
        sens = _number(operating_point.get("sensitivity"))
        spec = _number(operating_point.get("specificity"))
        if math.isfinite(sens) and math.isfinite(spec):
            thr = _number(operating_point.get("threshold"))
            label = "operating point"
            if math.isfinite(thr):
                label += f" (threshold {thr:.3g})"
            label += f"\nsensitivity {sens:.3f}, specificity {spec:.3f}"
            ax.plot(1 - spec, sens, "o", markersize=10, color="crimson", markeredgecolor="black",
                    zorder=6, label=label)

    if title is None:
        title = "ROC curve" if n_classes == 2 else "ROC curves (one-vs-rest)"
    ax.set_title(f"{title}\n(n = {n})")
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI)


# ------------------------------------------------------------------------ probability histogram


def plot_probability_histogram(
    y_true: Any,
    probs: Any,
    class_names: list[str],
    path: str | os.PathLike,
    negative_index: int | None = None,
    threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """Histogram of predicted probabilities split by the true class.

    Two classes or a ``negative_index``: one panel with the abnormality score
    ``1 - P(negative)`` for truly normal vs truly abnormal images (``threshold`` drawn as a line).
    Otherwise one panel per class with ``P(class)`` for that class vs the rest.
    """
    plt = _pyplot()
    probs, y, names, neg = _checked(y_true, probs, class_names, negative_index)
    n, n_classes = probs.shape
    bins = np.linspace(0.0, 1.0, 26)

    if neg is not None or n_classes == 2:
        neg = 0 if neg is None else neg
        score = 1.0 - probs[:, neg]
        groups = [(f"true {names[neg]} (n={int(np.sum(y == neg))})", score[y == neg], "C0"),
                  (f"true abnormal (n={int(np.sum(y != neg))})", score[y != neg], "C3")]
        if n_classes == 2:
            pos = 1 - neg
            xlabel = f"P({names[pos]})"
            groups[1] = (f"true {names[pos]} (n={int(np.sum(y == pos))})", score[y == pos], "C3")
        else:
            xlabel = f"abnormality score = 1 − P({names[neg]})"
        fig, ax = plt.subplots(figsize=(7.0, 4.4))
        for label, values, color in groups:
            ax.hist(values, bins=bins, alpha=0.55, color=color, label=label, edgecolor="white")
        if threshold is not None:
            ax.axvline(float(threshold), color="black", linestyle="--", linewidth=1.4,
                       label=f"threshold {float(threshold):.3g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("images")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(title or "Predicted probability by true class")
    else:
        cols = min(n_classes, 3)
        rows = math.ceil(n_classes / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for i, name in enumerate(names):
            ax = axes[i // cols][i % cols]
            ax.hist(probs[y != i, i], bins=bins, alpha=0.55, color="C0", edgecolor="white",
                    label=f"other classes (n={int(np.sum(y != i))})")
            ax.hist(probs[y == i, i], bins=bins, alpha=0.55, color="C3", edgecolor="white",
                    label=f"true {name} (n={int(np.sum(y == i))})")
            ax.set_xlim(0, 1)
            ax.set_xlabel(f"P({name})")
            ax.set_ylabel("images")
            ax.set_title(name)
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        for k in range(n_classes, rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.suptitle(title or "Predicted probability by true class")
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI)
