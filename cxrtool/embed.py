"""Embeddings: what a network learned, as one vector per image, and what can be read from it.

* :func:`extract` runs a checkpoint's model over an :class:`~cxrtool.data.ImageSet` with a forward
  hook on one layer (the checkpoint's ``embedding_layer`` by default, any named layer on request);
  a 4-D output is global-average-pooled, so every image becomes a float32 vector. Batches stream
  through :func:`~cxrtool.data.iter_batches` (decoding overlaps the forward pass; the set is never
  decoded into memory at once) and the forward pass stops at the hooked layer.
* :class:`Embeddings` holds the matrix with paths, labels, patient ids and split names and
  round-trips through a ``.npz`` (plus a CSV index), so a set is embedded once and reused.
* :func:`knn_score` fits a k-nearest-neighbour classifier (scikit-learn) on one set and scores it on
  another; :func:`knn_cross_validate` cross-validates on one set with folds grouped by patient.
* :func:`nearest` finds the most similar images to a query vector ("show me similar cases").
* 2-D projections (t-SNE, PCA, ...) are plugins: a :class:`ProjectionSpec` registered through the
  ``register_projections`` hook builds a :class:`Projection`; :func:`build_projection` merges options.

Nothing here imports torch or scikit-learn at module level (projection plugins import this module).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrtool import registry
from cxrtool.errors import DataError, ImageReadError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from cxrtool.checkpoint import Checkpoint
    from cxrtool.data import ImageSet

#: distance metrics for kNN and similar-case search
METRICS = ("cosine", "euclidean")
NPZ_FORMAT = "cxrtool-embeddings"
NPZ_VERSION = 1


# ------------------------------------------------------------------------------ projection plugins


@dataclass(frozen=True)
class ProjectionSpec:
    """A named 2-D projection of embeddings. ``build(**options)`` returns a :class:`Projection`.

    ``options`` maps every accepted option to its default (the CLI converts ``key=value`` strings to
    the default's type); ``deterministic`` says whether a fixed ``seed`` gives the same coordinates.
    """

    name: str
    build: Callable[..., Projection]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    deterministic: bool = True
    reference: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "options": dict(self.options),
                "deterministic": self.deterministic, "reference": self.reference}


class Projection:
    """Base class: ``check(n_points, dim)`` validates before any work, ``fit_transform`` maps to 2-D."""

    name = "base"

    def __init__(self, **options: Any) -> None:
        self.options = options

    def check(self, n_points: int, dim: int) -> None:
        """Raise a :class:`UsageError` / :class:`DataError` when the projection cannot run on this input."""
        if n_points == 0:
            raise DataError("no embeddings to project: the set is empty")
        if n_points < 2:
            raise DataError(f"{self.name}: need at least 2 points to project, got {n_points}")

    def fit_transform(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        """float32 (N, D) -> float32 (N, 2)."""
        raise NotImplementedError


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """A command-line string turned into the type of the option's default."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UsageError(f"projection {name!r} option {key}: expected {type(default).__name__}, got {value!r}") from None
    return value


def build_projection(name: str, options: dict[str, Any] | None = None) -> Projection:
    """The projection ``name`` with ``options`` merged over its defaults (unknown options: UsageError)."""
    spec: ProjectionSpec = registry.get("projection", name)
    options = dict(options or {})
    unknown = set(options) - set(spec.options)
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in spec.options.items()) or "(none)"
        raise UsageError(f"projection {name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    merged = {k: _coerce(name, k, options.get(k, v), v) for k, v in spec.options.items()}
    return spec.build(**merged)


def parse_options(items: list[str] | None) -> dict[str, str]:
    """``["perplexity=20", "max_iter=500"]`` -> ``{"perplexity": "20", "max_iter": "500"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------------ embeddings


@dataclass
class Embeddings:
    """One float32 vector per image plus what is known about the image.

    ``labels`` index ``class_names`` (-1: unknown); ``splits`` name the split each row came from
    (``train``/``test``/``all``...); ``patients`` are patient ids (``img:...`` when unknown).
    """

    vectors: np.ndarray
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    patients: list[str]
    splits: list[str]
    layer: str
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    model: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise DataError(f"embeddings must be a (N, D) matrix, got shape {self.vectors.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.vectors)
        for name in ("paths", "labels", "patients", "splits"):
            if len(getattr(self, name)) != n:
                raise DataError(f"embeddings: {len(getattr(self, name))} {name} for {n} vectors")

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def subset(self, idx) -> Embeddings:
        idx = np.asarray(idx, dtype=np.int64)
        return replace(self, vectors=self.vectors[idx], paths=[self.paths[i] for i in idx], labels=self.labels[idx],
                       patients=[self.patients[i] for i in idx], splits=[self.splits[i] for i in idx])

    def split_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.splits:
            out[s] = out.get(s, 0) + 1
        return out

    def select(self, splits: list[str] | None) -> Embeddings:
        """Only the rows of ``splits`` (None: all rows); an unknown split is a usage error."""
        if not splits:
            return self
        have = self.split_counts()
        missing = [s for s in splits if s not in have]
        if missing:
            raise UsageError(f"split {missing[0]!r} not in the embeddings (found: {', '.join(have) or 'none'})")
        return self.subset([i for i, s in enumerate(self.splits) if s in set(splits)])

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}

    def with_classes(self, class_names: list[str]) -> Embeddings:
        """Re-index labels onto ``class_names``; a labelled class not in it is a DataError."""
        mapping = {}
        for i, name in enumerate(self.class_names):
            if name not in class_names and (self.labels == i).any():
                raise DataError(f"class {name!r} is not among the reference classes ({', '.join(class_names)})")
            mapping[i] = class_names.index(name) if name in class_names else -1
        labels = np.array([mapping.get(int(v), -1) for v in self.labels], dtype=np.int64)
        return replace(self, labels=labels, class_names=list(class_names))

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (.npz) and its CSV index (same name, ``.csv``), each atomically."""
        from cxrtool.io import atomic_path, write_csv

        path = Path(path)
        if path.suffix.lower() != ".npz":
            raise UsageError(f"embeddings file must end in .npz, got {path}")
        arrays = {
            "format": np.array(NPZ_FORMAT),
            "format_version": np.array(NPZ_VERSION),
            "embeddings": self.vectors.astype(np.float32),
            "paths": np.array(self.paths, dtype=str),
            "labels": self.labels.astype(np.int64),
            "class_names": np.array(self.class_names, dtype=str),
            "patients": np.array(self.patients, dtype=str),
            "splits": np.array(self.splits, dtype=str),
            "layer": np.array(self.layer),
            "checkpoint": np.array(self.checkpoint),
            "checkpoint_sha256": np.array(self.checkpoint_sha256),
            "model": np.array(self.model),
            "preprocessing": np.array(json.dumps(self.preprocessing)),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        index = path.with_suffix(".csv")
        rows = [{"row": i, "path": p, "label": self.class_names[lab] if lab >= 0 else "", "patient_id": pt,
                 "split": s} for i, (p, lab, pt, s) in enumerate(zip(self.paths, self.labels, self.patients, self.splits, strict=True))]
        write_csv(index, rows, ["row", "path", "label", "patient_id", "split"])
        return path, index

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"embeddings file {path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:
            raise DataError(f"cannot read embeddings {path}: {type(exc).__name__}: {exc}") from None
        if "embeddings" not in data:
            raise DataError(f"{path} is not an embeddings file from `cxrtool embed extract` (no 'embeddings' array)")
        if int(data.get("format_version", 1)) > NPZ_VERSION:
            raise DataError(f"{path} was written by a newer cxrtool; upgrade cxrtool")

        def text(key: str) -> str:
            return str(data[key]) if key in data else ""

        try:
            paths = [str(p) for p in data["paths"]]
            n = len(paths)
            emb = cls(
                vectors=data["embeddings"],
                paths=paths,
                labels=data["labels"] if "labels" in data else np.full(n, -1),
                class_names=[str(c) for c in data.get("class_names", [])],
                patients=[str(p) for p in data["patients"]] if "patients" in data else [f"img:{p}" for p in paths],
                splits=[str(s) for s in data["splits"]] if "splits" in data else ["all"] * n,
                layer=text("layer"),
                checkpoint=text("checkpoint"),
                checkpoint_sha256=text("checkpoint_sha256"),
                model=text("model"),
                preprocessing=json.loads(text("preprocessing") or "{}"),
            )
        except (KeyError, ValueError) as exc:
            raise DataError(f"embeddings file {path} is incomplete or damaged: {exc}") from None
        return emb

    @staticmethod
    def concat(parts: list[Embeddings]) -> Embeddings:
        if not parts:
            raise DataError("no embeddings to combine")
        names = list(parts[0].class_names)
        for p in parts[1:]:
            names += [c for c in p.class_names if c not in names]
        parts = [p.with_classes(names) for p in parts]
        first = parts[0]
        return replace(
            first,
            vectors=np.concatenate([p.vectors for p in parts]),
            paths=[x for p in parts for x in p.paths],
            labels=np.concatenate([p.labels for p in parts]),
            patients=[x for p in parts for x in p.patients],
            splits=[x for p in parts for x in p.splits],
        )


def is_embeddings_file(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` written by :meth:`Embeddings.save` (not a MedMNIST archive)."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "embeddings" in z.files
    except Exception:
        return False


def relabel(emb: Embeddings, mode: str | None) -> Embeddings:
    """Derive other labels from the stored paths: ``kermany-subtype`` (normal / bacteria / virus)."""
    if mode in (None, "folder"):
        return emb
    if mode != "kermany-subtype":
        raise UsageError(f"--labels {mode} cannot be applied to stored embeddings (only kermany-subtype); "
                         f"re-run `cxrtool embed extract` with --labels {mode}")
    from cxrtool.data import KERMANY_SUBTYPES, kermany_subtype

    subtypes = [kermany_subtype(p, emb.class_names[lab] if lab >= 0 else None) for p, lab in zip(emb.paths, emb.labels, strict=True)]
    bad = [p for p, s in zip(emb.paths, subtypes, strict=True) if s is None]
    if bad:
        raise DataError(f"--labels kermany-subtype: {len(bad)} file name(s) name no subtype, e.g. {bad[0]}")
    names = [s for s in KERMANY_SUBTYPES if s in set(subtypes)]
    return replace(emb, labels=np.array([names.index(s) for s in subtypes], dtype=np.int64), class_names=names)


# -------------------------------------------------------------------------------------- extraction


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_names(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def default_layer(ckpt: Checkpoint) -> str:
    """The checkpoint's declared embedding layer (inside ``stage1`` for a cascade)."""
    layer = ckpt.meta.get("embedding_layer")
    if not layer:
        from cxrtool.models import get_spec

        layer = get_spec(ckpt.meta["model"]["name"]).embedding_layer
    return f"stage1.{layer}" if ckpt.meta.get("cascade") else layer


def resolve_layer(ckpt: Checkpoint, layer: str | None) -> str:
    """``layer`` checked against the model (None: the default); unknown names list the valid ones."""
    names = layer_names(ckpt.model)
    if layer is None:
        layer = default_layer(ckpt)
    if layer in names:
        return layer
    if ckpt.meta.get("cascade") and f"stage1.{layer}" in names:
        return f"stage1.{layer}"
    shown = names
    if len(names) > 60:  # big models: the top two levels, the full list is long
        shown = [n for n in names if n.count(".") <= 1]
        shown = shown[:60] + ([f"... ({len(names)} layers in all)"] if len(shown) > 60 or len(shown) < len(names) else [])
    raise UsageError(f"model has no layer {layer!r}; valid layers: {', '.join(shown)}")


class _Stop(Exception):
    """Raised by the hook once the embedding layer has run: the rest of the forward pass is skipped."""


def pool(out) -> np.ndarray:
    """A layer output -> (N, D) float32: 4-D maps are global-average-pooled, other shapes flattened."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 4:
        out = out.mean(dim=(2, 3))
    elif out.ndim > 2:
        out = out.flatten(2).mean(dim=2)
    elif out.ndim == 1:
        out = out[:, None]
    return out.float().cpu().numpy()


class LayerTap:
    """``with LayerTap(model, "avgpool") as tap: vectors = tap(x)``: the pooled output of one layer.

    A forward hook captures the layer's output and stops the forward pass there (the layers after it,
    e.g. the classifier head, are not run). Call under ``torch.inference_mode()``.
    """

    def __init__(self, model, layer: str) -> None:
        self.model, self.layer = model, layer
        self.module = model.get_submodule(layer)
        self._captured: list = []
        self._handle = None

    def _hook(self, _module, _inputs, output):
        self._captured.append(output)
        raise _Stop

    def __enter__(self) -> LayerTap:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, x) -> np.ndarray:
        self._captured.clear()
        try:
            self.model(x)
        except _Stop:
            pass
        if not self._captured:
            raise UsageError(f"layer {self.layer!r} is not used by the model's forward pass; pick another --layer")
        return pool(self._captured[0])


def extract(
    ckpt: Checkpoint,
    ds: ImageSet,
    *,
    layer: str | None = None,
    split: str = "all",
    batch_size: int = 64,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    sha256: str | None = None,
    workers: int | None = None,
) -> Embeddings:
    """The embedding of every readable image of ``ds`` (unreadable ones are skipped with a warning).

    Batches stream from :func:`~cxrtool.data.iter_batches` (decoding of the next batch overlaps the
    forward pass of this one); only the (N, D) vectors are kept.
    """
    import torch

    from cxrtool.data import checked_batches
    from cxrtool.imaging import to_tensor

    if len(ds) == 0:
        raise DataError(f"no images to embed in split {split!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    layer = resolve_layer(ckpt, layer)
    model = ckpt.model
    model.eval()
    pp = ckpt.preprocessing
    chunks, kept, failures = [], [], []
    with LayerTap(model, layer) as tap, torch.inference_mode():
        for arr, idx, bad in checked_batches(ds, pp, batch_size, failures, strict=strict, workers=workers):
            if len(idx):
                chunks.append(tap(to_tensor(arr, pp)))
                kept.extend(idx)
            if progress:
                progress(len(idx) + len(bad))
    if not kept:
        raise DataError(f"none of the {len(ds)} images in split {split!r} could be read")
    vectors = np.concatenate(chunks)
    if not np.isfinite(vectors).all():
        raise DataError(f"layer {layer!r} produced NaN or infinite values")
    sub = ds.subset(kept)
    return Embeddings(
        vectors=vectors, paths=list(sub.paths), labels=sub.labels, class_names=list(sub.class_names),
        patients=list(sub.patients), splits=[split] * len(kept), layer=layer, checkpoint=str(ckpt.path),
        checkpoint_sha256=sha256 if sha256 is not None else file_sha256(ckpt.path),
        model=str(ckpt.meta.get("model", {}).get("name", "")), preprocessing=ckpt.preprocessing.to_dict(),
    )


# --------------------------------------------------------------------------------------- kNN


def _check_knn(k: int, metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if k < 1:
        raise UsageError(f"--k must be >= 1, got {k}")


def _require_labels(emb: Embeddings, what: str) -> None:
    if len(emb) == 0:
        raise DataError(f"the {what} set is empty")
    unlabelled = int((emb.labels < 0).sum())
    if unlabelled:
        raise DataError(f"{unlabelled} image(s) in the {what} set have no label")


def _classifier(k: int, metric: str):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")


def _votes(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Vote shares (N, n_classes) for every class, including classes absent from the fit set."""
    proba = clf.predict_proba(x)
    out = np.zeros((len(x), n_classes), dtype=np.float64)
    out[:, clf.classes_.astype(np.int64)] = proba
    return out


def _metrics(y: np.ndarray, votes: np.ndarray, names: list[str]) -> dict[str, Any]:
    from cxrtool.metrics import classification_metrics

    if len(names) < 2:  # classification_metrics needs two columns
        raise DataError(f"kNN needs at least two classes, got {', '.join(names) or 'none'}")
    result = classification_metrics(y, votes, names)
    result.pop("log_loss", None)  # vote shares are not calibrated probabilities
    result["decision"]["rule"] = "majority vote (ties: lower class index)"
    return result


def knn_score(ref: Embeddings, query: Embeddings, *, k: int = 7, metric: str = "cosine") -> dict[str, Any]:
    """Fit kNN on ``ref`` and score it on ``query``; returns metrics plus ``votes``/``predicted``."""
    _check_knn(k, metric)
    _require_labels(ref, "reference")
    _require_labels(query, "query")
    if k > len(ref):
        raise UsageError(f"--k {k} is larger than the reference set ({len(ref)} images)")
    query = query.with_classes(ref.class_names)
    shared = sorted(set(ref.patients) & set(query.patients))
    if shared:
        from cxrtool.data import DataWarning

        warnings.warn(f"{len(shared)} patient(s) are in both the reference and the query set (e.g. {shared[0]}); "
                      "the score is not patient-held-out", DataWarning, stacklevel=2)
    clf = _classifier(k, metric).fit(ref.vectors, ref.labels)
    votes = _votes(clf, query.vectors, len(ref.class_names))
    result = _metrics(query.labels, votes, ref.class_names)
    result.update({"mode": "fit/score", "k": k, "metric": metric, "n_reference": len(ref), "n_query": len(query),
                   "shared_patients": len(shared), "votes": votes, "predicted": np.argmax(votes, axis=1)})
    return result


def knn_cross_validate(emb: Embeddings, *, k: int = 7, metric: str = "cosine", folds: int = 5,
                       seed: int = 0) -> dict[str, Any]:
    """Out-of-fold kNN predictions with folds grouped by patient (stratified by class)."""
    from sklearn.model_selection import StratifiedGroupKFold

    _check_knn(k, metric)
    _require_labels(emb, "cross-validation")
    if folds < 2:
        raise UsageError(f"--folds must be >= 2, got {folds}")
    groups = np.array(emb.patients)
    n_groups = len(set(emb.patients))
    if n_groups < folds:
        raise DataError(f"only {n_groups} patients: too few for {folds} patient-grouped folds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only N members"
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(emb.vectors, emb.labels, groups))
    smallest = min(len(tr) for tr, _ in splits)
    if k > smallest:
        raise UsageError(f"--k {k} is larger than the smallest training fold ({smallest} images)")
    votes = np.zeros((len(emb), len(emb.class_names)))
    fold_acc = []
    for tr, te in splits:
        clf = _classifier(k, metric).fit(emb.vectors[tr], emb.labels[tr])
        votes[te] = _votes(clf, emb.vectors[te], len(emb.class_names))
        fold_acc.append(float(np.mean(np.argmax(votes[te], axis=1) == emb.labels[te])))
    result = _metrics(emb.labels, votes, emb.class_names)
    result.update({
        "mode": "cross-validation", "k": k, "metric": metric, "folds": folds, "seed": seed,
        "grouped_by": "image (no patient ids)" if all(p.startswith(("img:", "npz://")) for p in emb.patients) else "patient",
        "n_reference": len(emb), "n_query": len(emb), "fold_accuracy": fold_acc,
        "fold_accuracy_sd": float(np.std(fold_acc)), "votes": votes, "predicted": np.argmax(votes, axis=1),
    })
    return result


# ------------------------------------------------------------------------------- similar cases


def distances(vectors: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Distance of each row of ``vectors`` to ``q``: ``1 - cos`` or Euclidean."""
    v = vectors.astype(np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    if metric == "cosine":
        nv = np.linalg.norm(v, axis=1)
        nq = np.linalg.norm(q)
        denom = np.where(nv * nq > 0, nv * nq, 1.0)
        return np.maximum(1.0 - (v @ q) / denom, 0.0)
    if metric == "euclidean":
        return np.sqrt(np.maximum(((v - q) ** 2).sum(axis=1), 0.0))
    raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")


def nearest(emb: Embeddings, q: np.ndarray, *, k: int = 8, metric: str = "cosine",
            exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and distances of the ``k`` rows closest to ``q`` (ties: lower row first)."""
    _check_knn(k, metric)
    if len(emb) == 0:
        raise DataError("the embedded set is empty")
    if np.asarray(q).size != emb.dim:
        raise DataError(f"query embedding has {np.asarray(q).size} values, the set has {emb.dim}")
    d = distances(emb.vectors, q, metric)
    allowed = np.ones(len(emb), bool) if exclude is None else ~np.asarray(exclude, bool)
    available = int(allowed.sum())
    if k > available:
        raise UsageError(f"--k {k} is larger than the embedded set ({available} candidate images)")
    order = np.array([i for i in np.argsort(d, kind="stable") if allowed[i]][:k], dtype=np.int64)
    return order, d[order]


# ------------------------------------------------------------------------------------- figures


def _pyplot():
    from cxrtool.report import _pyplot as plt

    return plt()


def plot_projection(coords: np.ndarray, groups: list[str], order: list[str], path: str | Path, *, title: str,
                    legend_title: str, markers: list[str] | None = None, colors: list | None = None,
                    emphasise_later: bool = False) -> Path:
    """Scatter of 2-D ``coords`` coloured by ``groups`` (drawn in ``order``, with counts in the legend)."""
    from cxrtool.io import save_figure

    plt = _pyplot()
    n = len(coords)
    size = 14 if n < 500 else 7 if n < 3000 else 4
    fig, ax = plt.subplots(figsize=(7.6, 6.6))
    groups_arr = np.array(groups)
    for i, g in enumerate(order):
        m = groups_arr == g
        if not m.any():
            continue
        later = emphasise_later and i > 0  # e.g. held-out points over the training cloud
        ax.scatter(coords[m, 0], coords[m, 1], s=size * (2.2 if later else 1.0),
                   alpha=0.9 if later else 0.75 if n < 3000 else 0.55, linewidths=0,
                   marker=(markers[i] if markers else "o"), color=(colors[i] if colors else f"C{i % 10}"),
                   label=f"{g} (n={int(m.sum())})", rasterized=n > 2000)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    leg = ax.legend(title=legend_title, fontsize=9, markerscale=max(1.0, 30 / size) ** 0.5, framealpha=0.9,
                    loc="best")
    leg.get_title().set_fontsize(9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def read_thumbnail(path: str, size: int, resize: str = "letterbox") -> np.ndarray | None:
    """A uint8 (size, size) view of an image (or ``npz://`` reference); None when it cannot be read."""
    from cxrtool.imaging import Preprocessing, load, preprocess

    pp = Preprocessing(size=size, resize=resize)
    try:
        if path.startswith("npz://"):
            file, _, ref = path[len("npz://"):].rpartition("#")
            split, _, index = ref.partition("/")
            with np.load(file, allow_pickle=False) as z:
                arr = z[f"{split}_images"][int(index)]
            if arr.ndim == 3:
                arr = arr.mean(axis=-1)
            return preprocess(arr.astype(np.float32) / 255.0, pp)
        return load(path, pp)
    except (ImageReadError, OSError, KeyError, ValueError, IndexError):
        return None


def plot_similar(query: np.ndarray, query_title: str, tiles: list[tuple[np.ndarray | None, str]], path: str | Path,
                 *, title: str) -> Path:
    """Thumbnail grid: the query first (red frame), then each neighbour with its caption."""
    from cxrtool.io import save_figure

    plt = _pyplot()
    n = len(tiles) + 1
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.25 * rows), squeeze=False)
    cells = [(query, query_title, True)] + [(img, cap, False) for img, cap in tiles]
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(cells):
            ax.set_visible(False)
            continue
        img, caption, is_query = cells[k]
        if img is None:
            ax.set_facecolor("0.85")
            ax.text(0.5, 0.5, "cannot read", ha="center", va="center", transform=ax.transAxes, color="0.3")
        else:
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=8.5, color="crimson" if is_query else "black",
                     fontweight="bold" if is_query else "normal")
        for spine in ax.spines.values():
            spine.set_edgecolor("crimson" if is_query else "0.6")
            spine.set_linewidth(3.0 if is_query else 0.8)
    fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
