"""Classification metrics and the decision rule (numpy + scikit-learn only, no torch).

The decision rule (:func:`decide`) is shared by evaluation and prediction so both turn
probabilities into classes the same way:

* no threshold: the most probable class (argmax);
* a threshold and a negative class (for example ``NORMAL``): the *abnormality score*
  ``1 - p(negative)`` is compared with the threshold; at or above it the most probable
  non-negative class is predicted, below it the negative class. For two classes this is the usual
  threshold on the positive-class probability; for more it is an operating point for
  "any disease vs normal".

Everything returned by :func:`classification_metrics` and :func:`choose_threshold` is plain
Python (floats, ints, lists, ``None`` for undefined values) and can go straight to JSON.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from cxrtool.errors import DataError, UsageError

#: probabilities are clipped to [EPS, 1] before the log in the log loss
_LOG_EPS = 1e-15


# ---------------------------------------------------------------------------- validation helpers


def _as_probs(probs: Any) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(f"probabilities must have shape (N, C) with C >= 2, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError("probabilities contain NaN or infinite values")
    return arr


def _check_negative_index(negative_index: int | None, n_classes: int) -> int | None:
    if negative_index is None:
        return None
    if isinstance(negative_index, bool) or not isinstance(negative_index, (int, np.integer)):
        raise UsageError(f"negative class index must be an integer, got {negative_index!r}")
    if not 0 <= int(negative_index) < n_classes:
        raise UsageError(f"negative class index {negative_index} is out of range for {n_classes} classes")
    return int(negative_index)


def _ratio(num: float, den: float) -> float | None:
    """``num / den`` as a float, ``None`` when the denominator is zero (undefined)."""
    return float(num) / float(den) if den else None


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _binary_auroc(is_positive: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of ``score`` for ``is_positive``; ``None`` when only one group is present."""
    from sklearn.metrics import roc_auc_score

    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, score))


# ------------------------------------------------------------------------------- decision rule


def abnormal_score(probs: np.ndarray, negative_index: int) -> np.ndarray:
    """The abnormality score ``1 - probs[:, negative_index]`` (shape ``(N,)``)."""
    probs = _as_probs(probs)
    neg = _check_negative_index(negative_index, probs.shape[1])
    if neg is None:
        raise UsageError("abnormal_score needs the index of the negative (normal) class")
    return 1.0 - probs[:, neg]


def decide(
    probs: np.ndarray, negative_index: int | None = None, threshold: float | None = None
) -> np.ndarray:
    """Turn probabilities ``(N, C)`` into predicted class indices ``(N,)`` (int64).

    Without ``threshold``: argmax. With a threshold the abnormality score
    ``1 - probs[:, negative_index]`` decides abnormal (score >= threshold: the most probable
    non-negative class) vs the negative class. With two classes and no ``negative_index``, class 0
    is taken as negative (the threshold applies to the probability of class 1); with more classes a
    threshold needs ``negative_index``.
    """
    probs = _as_probs(probs)
    n_classes = probs.shape[1]
    neg = _check_negative_index(negative_index, n_classes)
    if threshold is None:
        return np.argmax(probs, axis=1).astype(np.int64)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise UsageError(f"decision threshold must be a finite number, got {threshold}")
    if neg is None:
        if n_classes != 2:
            raise UsageError(
                f"a decision threshold with {n_classes} classes needs a negative (normal) class"
            )
        neg = 0
    score = 1.0 - probs[:, neg]
    others = probs.copy()
    others[:, neg] = -np.inf
    best_abnormal = np.argmax(others, axis=1)
    return np.where(score >= threshold, best_abnormal, neg).astype(np.int64)


def choose_threshold(
    is_abnormal: np.ndarray,
    score: np.ndarray,
    target_sensitivity: float | None = None,
    target_specificity: float | None = None,
) -> dict:
    """Pick a threshold on ``score`` (abnormal when ``score >= threshold``) meeting one target.

    * ``target_sensitivity=t``: the largest threshold whose sensitivity is at least ``t``
      (as specific as possible while catching the required share of abnormal cases);
    * ``target_specificity=t``: the smallest threshold whose specificity is at least ``t``.

    Returns ``{"threshold", "target", "sensitivity", "specificity", "n_abnormal", "n_normal"}``
    with sensitivity and specificity measured on the given data at that threshold.
    """
    from sklearn.metrics import roc_curve

    if (target_sensitivity is None) == (target_specificity is None):
        raise UsageError("give exactly one of a target sensitivity or a target specificity")
    kind = "sensitivity" if target_sensitivity is not None else "specificity"
    target = float(target_sensitivity if target_sensitivity is not None else target_specificity)
    if not (0.0 < target <= 1.0):
        raise UsageError(f"target {kind} must be in (0, 1], got {target}")

    is_abnormal = np.asarray(is_abnormal).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if is_abnormal.shape != score.shape:
        raise DataError(f"{is_abnormal.size} labels but {score.size} scores")
    if not np.all(np.isfinite(score)):
        raise DataError("scores contain NaN or infinite values")
    n_abnormal = int(is_abnormal.sum())
    n_normal = int(is_abnormal.size - n_abnormal)
    if n_abnormal == 0 or n_normal == 0:
        raise DataError(
            f"cannot choose a threshold: need both abnormal and normal samples, "
            f"got {n_abnormal} abnormal and {n_normal} normal"
        )

    # thresholds are decreasing, tpr/fpr increasing; one row per distinct score (+ a leading inf)
    fpr, tpr, thresholds = roc_curve(is_abnormal, score, drop_intermediate=False)
    tol = 1e-12  # so that e.g. 4/5 counts as reaching 0.8
    if kind == "sensitivity":
        # the first (largest) threshold reaching the target; tpr ends at 1 so one always exists
        idx = int(np.argmax(tpr >= target - tol))
    else:
        # the last (smallest) threshold still reaching the target; row 0 (inf) has specificity 1
        idx = int(np.nonzero(1.0 - fpr >= target - tol)[0][-1])
    thr = float(thresholds[idx])
    if not math.isfinite(thr):
        # nothing may be called abnormal: just above the largest score (keeps the JSON finite)
        thr = float(np.nextafter(score.max(), np.inf))

    predicted = score >= thr
    tp = int(np.sum(predicted & is_abnormal))
    tn = int(np.sum(~predicted & ~is_abnormal))
    return {
        "threshold": thr,
        "target": {kind: target},
        "sensitivity": tp / n_abnormal,
        "specificity": tn / n_normal,
        "n_abnormal": n_abnormal,
        "n_normal": n_normal,
    }


# ------------------------------------------------------------------------------------ metrics


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    negative_index: int | None = None,
    threshold: float | None = None,
) -> dict:
    """All evaluation metrics as a JSON-ready dict (undefined values are ``None``).

    Predictions come from :func:`decide` with ``negative_index`` and ``threshold``. Keys:

    * ``n``, ``accuracy``, ``balanced_accuracy`` (mean recall over classes present in ``y_true``);
    * ``per_class[name]``: ``precision``, ``recall`` (= sensitivity), ``specificity``
      (one-vs-rest), ``f1``, ``support``, ``auroc`` (one-vs-rest; ``None`` if the class is absent
      from ``y_true``, or is the only class present). ``precision`` is ``None`` when the class is
      never predicted;
    * ``macro``: the per-class values averaged over the classes present in ``y_true`` (listed in
      ``macro["classes"]``); there a never-predicted class counts with precision 0 (as
      scikit-learn's ``zero_division=0``); ``None`` when no class has a defined value;
    * ``auroc``: two classes: AUROC of the positive class (the one that is not ``negative_index``,
      class 1 by default); more classes: macro one-vs-rest AUROC, ``None`` unless every class is
      present in ``y_true`` (as scikit-learn);
    * ``log_loss`` (probabilities clipped at 1e-15), ``confusion_matrix`` (rows = true,
      columns = predicted, every class has a row and a column);
    * with ``negative_index``: ``abnormal_vs_normal`` with ``sensitivity``, ``specificity``,
      ``ppv``, ``npv``, ``auroc`` of the abnormality score, ``threshold`` (``None`` = argmax),
      ``n_abnormal``, ``n_normal``.
    """
    probs = _as_probs(probs)
    n, n_classes = probs.shape
    class_names = [str(c) for c in class_names]
    if len(class_names) != n_classes:
        raise DataError(f"{len(class_names)} class names but probabilities have {n_classes} columns")
    y = np.asarray(y_true).ravel()
    if y.size != n:
        raise DataError(f"{y.size} labels but {n} rows of probabilities")
    if n == 0:
        raise DataError("cannot compute metrics on an empty set")
    if not np.issubdtype(y.dtype, np.integer):
        try:
            yf = y.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError("labels must be integer class indices") from None
        if not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)):
            raise DataError("labels must be integer class indices")
        y = yf
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise DataError(f"labels must be in 0..{n_classes - 1}, got values in {y.min()}..{y.max()}")
    neg = _check_negative_index(negative_index, n_classes)

    pred = decide(probs, neg, threshold)

    with warnings.catch_warnings():
        from sklearn.exceptions import UndefinedMetricWarning
        from sklearn.metrics import confusion_matrix

        warnings.simplefilter("ignore", UndefinedMetricWarning)
        cm = confusion_matrix(y, pred, labels=list(range(n_classes))).astype(np.int64)

        per_class: dict[str, dict[str, Any]] = {}
        present: list[str] = []
        for i, name in enumerate(class_names):
            tp = int(cm[i, i])
            fn = int(cm[i, :].sum()) - tp
            fp = int(cm[:, i].sum()) - tp
            tn = n - tp - fn - fp
            support = tp + fn
            if support:
                present.append(name)
            per_class[name] = {
                "precision": _ratio(tp, tp + fp),
                "recall": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "f1": _ratio(2 * tp, 2 * tp + fp + fn),
                "support": support,
                "auroc": _binary_auroc(y == i, probs[:, i]),
            }

        macro: dict[str, Any] = {}
        for key in ("precision", "recall", "specificity", "f1", "auroc"):
            values = []
            for name in present:
                v = per_class[name][key]
                if v is None and key == "precision":
                    v = 0.0  # present but never predicted: no correct positive call
                values.append(v)
            macro[key] = _mean_defined(values)
        macro["classes"] = present

        if n_classes == 2:
            pos = 1 if neg in (None, 0) else 0
            auroc = per_class[class_names[pos]]["auroc"]
        else:
            aurocs = [per_class[name]["auroc"] for name in class_names]
            auroc = None if any(a is None for a in aurocs) else float(np.mean(aurocs))

        p_true = np.clip(probs[np.arange(n), y], _LOG_EPS, 1.0)
        log_loss = float(-np.mean(np.log(p_true)))

        out: dict[str, Any] = {
            "n": int(n),
            "class_names": class_names,
            "decision": {
                "rule": "argmax" if threshold is None else "threshold",
                "threshold": None if threshold is None else float(threshold),
                "negative_class": None if neg is None else class_names[neg],
            },
            "accuracy": float(np.mean(pred == y)),
            "balanced_accuracy": _mean_defined([per_class[name]["recall"] for name in present]),
            "per_class": per_class,
            "macro": macro,
            "auroc": auroc,
            "log_loss": log_loss,
            "confusion_matrix": cm.tolist(),
        }

        if neg is not None:
            is_abn = y != neg
            pred_abn = pred != neg
            tp = int(np.sum(pred_abn & is_abn))
            fn = int(np.sum(~pred_abn & is_abn))
            fp = int(np.sum(pred_abn & ~is_abn))
            tn = int(np.sum(~pred_abn & ~is_abn))
            out["abnormal_vs_normal"] = {
                "negative_class": class_names[neg],
                "threshold": None if threshold is None else float(threshold),
                "sensitivity": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "ppv": _ratio(tp, tp + fp),
                "npv": _ratio(tn, tn + fn),
                "auroc": _binary_auroc(is_abn, 1.0 - probs[:, neg]),
                "n_abnormal": int(is_abn.sum()),
                "n_normal": int((~is_abn).sum()),
            }
    return out
