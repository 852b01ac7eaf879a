"""Anomaly detection trained on normal chest X-rays only: the detector contract, thresholds, runs.

A plugin registers a :class:`DetectorSpec` through the ``register_anomaly_detectors`` hook; its
``build(**options)`` returns a :class:`Detector`. A detector

* ``fit(images, ctx)``: learns from uint8 images ``(N, size, size)`` that are all normal;
* ``score(images)``: returns ``(scores, heatmaps)``, float ``(N,)`` (higher = more anomalous) and
  float32 ``(N, size, size)`` maps at model-input resolution (where the score comes from);
* ``state_dict()`` / ``extra_meta()``: its tensors and the JSON it needs to be rebuilt by
  :meth:`Detector.from_state` (via ``load_state``).

Thresholds never see an abnormal image. :func:`train_detector` keeps a patient-held-out *threshold
slice* of the normal training images away from ``fit``, scores it, and puts the threshold where the
requested share of those normal images scores below it (``--target-specificity 0.95``: 95 %). The
threshold, the slice's sorted scores and their summary are stored in the checkpoint metadata
(``kind: "anomaly"``), with the preprocessing, so ``anomaly score`` / ``anomaly evaluate`` see
images exactly as training did. An image is called abnormal when ``score >= threshold``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrtool import registry
from cxrtool.errors import CheckpointError, DataError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from cxrtool.data import ImageSet
    from cxrtool.imaging import Preprocessing

CHECKPOINT_KIND = "anomaly"
CHECKPOINT_NAME = "model.safetensors"
LATEST_POINTER = "latest-anomaly"
#: class names that count as "normal" when --normal-class is not given (case-insensitive)
NORMAL_NAMES = ("normal", "no finding", "no_finding", "healthy", "negative")
#: fewest normal images ``fit`` may get, and fewest in the threshold slice
MIN_FIT_IMAGES = 8
MIN_THRESHOLD_IMAGES = 10


class AnomalyWarning(UserWarning):
    """Training data that looks wrong for a normal-only detector (abnormal labels, few images)."""


# ------------------------------------------------------------------------------------------------
# spec and base class


@dataclass(frozen=True)
class DetectorSpec:
    """A named anomaly detector. ``build(**options)`` returns an untrained :class:`Detector`.

    ``uses_backbone``: the detector takes a feature network (option ``backbone``); whether the
    result is still "trained on normal images only" depends on that network and is recorded per
    checkpoint (``trained_on_normal_only``).
    """

    name: str
    build: Callable[..., Detector]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    uses_backbone: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "options": dict(self.options),
                "reference": self.reference, "uses_backbone": self.uses_backbone}


@dataclass
class FitContext:
    """What ``fit`` may use: how inputs were made, the seed, threads, where to report progress."""

    preprocessing: Preprocessing
    seed: int = 0
    batch_size: int = 64
    progress: Callable[[str, int], Callable[[int], None]] | None = None  # start(desc, total) -> advance(n)
    log: Callable[[str], None] | None = None  # one line per epoch / stage

    def say(self, message: str) -> None:
        if self.log:
            self.log(message)

    def bar(self, description: str, total: int) -> Callable[[int], None]:
        return self.progress(description, total) if self.progress else (lambda n=1: None)


class Detector:
    """Base class. Subclasses set ``name`` and implement fit / score / state_dict / load_state."""

    name = "base"

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.preprocessing: Preprocessing | None = None

    # -- to implement ------------------------------------------------------------------------------
    def fit(self, images: np.ndarray, ctx: FitContext) -> dict[str, Any]:
        """Learn from normal uint8 images (N, size, size); returns a JSON-ready training report."""
        raise NotImplementedError

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, size, size) -> (scores float64 (N,), heatmaps float32 (N, size, size))."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Tensors to store (``{name: torch.Tensor}``)."""
        raise NotImplementedError

    def load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` tensors and :meth:`extra_meta`."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------------
    def extra_meta(self) -> dict[str, Any]:
        """JSON-ready facts needed to rebuild the detector (stored in the checkpoint)."""
        return {}

    def uses_abnormal_labels(self) -> bool:
        """True when something the detector relies on (a classifier backbone) saw abnormal labels."""
        return False

    def describe(self) -> str:
        """One line for logs and docs: what the detector models, on which features."""
        return self.name

    @classmethod
    def from_state(cls, options: dict[str, Any], state: dict[str, Any], extra: dict[str, Any],
                   preprocessing: Preprocessing) -> Detector:
        det = cls(**options)
        det.preprocessing = preprocessing
        det.load_state(state, extra)
        return det


def get_spec(name: str) -> DetectorSpec:
    return registry.get("anomaly detector", name)


def check_options(spec: DetectorSpec, options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(spec.options)
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in spec.options.items()) or "(none)"
        raise UsageError(f"detector {spec.name!r} has no option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return {**spec.options, **options}


def build_detector(name: str, options: dict[str, Any] | None = None) -> Detector:
    """The detector ``name`` with ``options`` merged over its defaults (unknown options: UsageError)."""
    spec = get_spec(name)
    return spec.build(**check_options(spec, options or {}))


# ------------------------------------------------------------------------------------------------
# thresholds from normal images only


def min_threshold_images(target_specificity: float) -> int:
    """Normal images the threshold slice needs: at least 10, and enough that ``1 - target`` of them
    is at least one image (else the quantile is the slice maximum, not an estimate)."""
    if target_specificity >= 1.0:
        return MIN_THRESHOLD_IMAGES
    return max(MIN_THRESHOLD_IMAGES, math.ceil(1.0 / (1.0 - target_specificity) - 1e-9))


def normal_threshold(scores: np.ndarray, target_specificity: float) -> dict[str, Any]:
    """The threshold below which ``target_specificity`` of the normal ``scores`` fall.

    With sorted scores s_1 <= ... <= s_n and k = ceil(target * n), the threshold lies halfway
    between s_k and s_(k+1) (just above s_k when they tie, or when k = n), so exactly the k lowest
    normal scores are below it: specificity on the slice = k / n >= target.
    """
    if not 0.0 < float(target_specificity) <= 1.0:
        raise UsageError(f"--target-specificity must be in (0, 1], got {target_specificity}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise DataError("cannot set a threshold: the normal scores are empty or not finite")
    n = s.size
    k = min(n, max(1, math.ceil(float(target_specificity) * n - 1e-9)))
    lo = s[k - 1]
    if k < n and s[k] > lo:
        thr = float(lo + (s[k] - lo) / 2.0)
        if not thr > lo:  # adjacent floats
            thr = float(s[k])
    else:
        thr = float(np.nextafter(lo, np.inf))
    achieved = float(np.mean(s < thr))
    return {
        "threshold": thr,
        "target": {"specificity": float(target_specificity)},
        "specificity": achieved,
        "sensitivity": None,
        "n_normal": int(n),
        "n_abnormal": 0,
    }


def score_summary(scores: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64)
    q = np.quantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(s.size), "mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
            "max": float(s.max()), "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
            "q75": float(q[3]), "q95": float(q[4])}


# ------------------------------------------------------------------------------------------------
# training data: normal images only


@dataclass
class NormalData:
    normals: ImageSet
    normal_class: str
    split: str
    excluded: dict[str, int]  # label -> images left out because they are not normal
    notes: list[str]


def _normal_name(names: list[str], requested: str | None, data: str) -> str | None:
    if requested:
        for n in names:
            if n.lower() == requested.lower():
                return n
        raise UsageError(f"--normal-class {requested!r} is not a class of {data} (classes: {', '.join(names)})")
    for n in names:
        if n.lower() in NORMAL_NAMES:
            return n
    return None


def _has_class_dirs(path: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def select_normals(data: str | Path, normal_class: str | None = None, split: str | None = None) -> NormalData:
    """The normal images of ``data``; everything labelled otherwise is left out with a warning.

    ``data``: a folder per class (``NORMAL/`` is used, the rest warned about), a CSV manifest or
    ``.npz`` (rows of the normal class, from the ``train`` split when there is one), or a plain
    folder of images (all taken as normal, except Kermany file names that say bacteria / virus).
    """
    from cxrtool.data import ImageSet, gather_images, kermany_patient, kermany_subtype, load_splits

    path = Path(data)
    excluded: dict[str, int] = {}
    notes: list[str] = []
    if path.is_dir() and not _has_class_dirs(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            files = gather_images([path]) if any(path.iterdir()) else []
        if not files:
            raise DataError(f"--data {path}: no images found")
        patients = [kermany_patient(f) for f in files]
        ds = ImageSet(files, np.zeros(len(files), np.int64), ["normal"],
                      [p or f"img:{f}" for p, f in zip(patients, files)], has_patient_ids=all(patients))
        name, split_name = "normal", "all"
        notes.append(f"{path} has no class folders: all {len(files)} images taken as normal")
    else:
        splits = load_splits(path)
        if split:
            if split not in splits:
                raise UsageError(f"--split {split!r} not in {path} (found: {', '.join(splits)})")
            split_name = split
        else:
            split_name = "train" if "train" in splits else ("all" if "all" in splits else next(iter(splits)))
        ds = splits[split_name]
        others = [s for s in splits if s != split_name]
        if others:
            notes.append(f"using split {split_name!r} of {path}; split(s) {', '.join(others)} not used for training")
        name = _normal_name(ds.class_names, normal_class, str(path))
        if name is None:
            raise DataError(
                f"{path}: no normal class among {', '.join(ds.class_names)}; anomaly detectors train on normal "
                "images only: name the normal class with --normal-class"
            )
        idx = ds.class_names.index(name)
        for i, cname in enumerate(ds.class_names):
            if i != idx and int((ds.labels == i).sum()):
                excluded[cname] = int((ds.labels == i).sum())
        if (ds.labels < 0).any():
            excluded["(no label)"] = int((ds.labels < 0).sum())
        ds = ds.subset(np.flatnonzero(ds.labels == idx))
        ds.labels[:] = 0
        ds.class_names = [name]
    if excluded:
        shown = ", ".join(f"{n} {label}" for label, n in excluded.items())
        warnings.warn(
            f"{path}: left out {sum(excluded.values())} image(s) not labelled {name!r} ({shown}); "
            "anomaly detectors train on normal images only",
            AnomalyWarning, stacklevel=2,
        )
    # labels that contradict "normal": Kermany file names saying bacteria / virus
    bad = [i for i, p in enumerate(ds.paths) if kermany_subtype(p) in ("bacteria", "virus")]
    if bad:
        warnings.warn(
            f"{len(bad)} image(s) given as normal have file names that say pneumonia (e.g. "
            f"{Path(ds.paths[bad[0]]).name}); left out of training",
            AnomalyWarning, stacklevel=2,
        )
        excluded["pneumonia by file name"] = len(bad)
        ds = ds.subset(np.setdiff1d(np.arange(len(ds)), bad))
    if len(ds) == 0:
        raise DataError(f"{path}: no normal images to train on")
    return NormalData(ds, name, split_name, excluded, notes)


# ------------------------------------------------------------------------------------------------
# training a detector into a run folder


@dataclass
class AnomalyConfig:
    """Everything ``anomaly train`` depends on; saved as ``config.json`` and in the checkpoint."""

    data: str = ""
    detector: str = "autoencoder"
    options: dict[str, Any] = field(default_factory=dict)
    normal_class: str | None = None
    split: str | None = None
    size: int = 128
    resize: str = "letterbox"
    equalize: str = "none"
    threshold_fraction: float = 0.2
    target_specificity: float = 0.95
    batch_size: int = 64
    seed: int = 0
    threads: int | None = None
    strict: bool = False
    out: str | None = None
    name: str | None = None

    def preprocessing(self) -> Preprocessing:
        from cxrtool.imaging import Preprocessing

        return Preprocessing(size=self.size, resize=self.resize, equalize=self.equalize)

    def validate(self) -> AnomalyConfig:
        if not 0.0 < self.threshold_fraction < 1.0:
            raise UsageError(f"--threshold-fraction must be between 0 and 1, got {self.threshold_fraction}")
        if not 0.0 < self.target_specificity <= 1.0:
            raise UsageError(f"--target-specificity must be in (0, 1], got {self.target_specificity}")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        self.preprocessing()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _runs_dir() -> Path:
    from cxrtool.checkpoint import runs_dir

    return runs_dir()


def _run_dir(cfg: AnomalyConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    base = _runs_dir()
    name = cfg.name or f"{time.strftime('%Y%m%d-%H%M%S')}-anomaly-{cfg.detector}"
    path, k = base / name, 1
    while path.exists():
        k += 1
        path = base / f"{name}-{k}"
    return path


def _split_normals(ds: ImageSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, threshold-slice indices), whole patients on one side."""
    from cxrtool.data import patient_split

    n_pat = len(set(ds.patients))
    if n_pat < 2:
        raise DataError(f"only {n_pat} patient(s) among the normal images: cannot hold out a threshold slice")
    if n_pat < max(2, round(1 / fraction)):  # too few patients for k-fold: a plain shuffled patient split
        rng = np.random.default_rng(seed)
        pats = sorted(set(ds.patients))
        held = set(rng.permutation(pats)[: max(1, round(fraction * len(pats)))])
        mask = np.array([p in held for p in ds.patients])
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    return patient_split(ds, fraction, seed)


def heatmap_scale(maps: np.ndarray) -> list[float]:
    """Colour scale for overlays from normal heatmaps: transparent up to their 90th percentile, full
    colour from their 99.9th (a normal image shows at most a few faint spots)."""
    flat = np.asarray(maps, dtype=np.float32).ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 2_000_000 + 1]
    lo, hi = np.quantile(flat, [0.9, 0.999])
    if not hi > lo:
        hi = lo + 1e-6
    return [float(lo), float(hi)]


def train_detector(cfg: AnomalyConfig, progress=None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit ``cfg.detector`` on the normal images of ``cfg.data``, threshold it on a held-out normal
    slice, and write the run folder atomically (nothing is left behind on failure)."""
    import torch

    from cxrtool import checkpoint as C
    from cxrtool.data import decode_all, write_split_csv
    from cxrtool.io import versions, write_csv, write_json

    cfg.validate()
    spec = get_spec(cfg.detector)
    options = check_options(spec, dict(cfg.options))
    detector = spec.build(**options)
    pp = cfg.preprocessing()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    nd = select_normals(cfg.data, cfg.normal_class, cfg.split)
    for note in nd.notes:
        if log:
            log(note)
    need_thr = min_threshold_images(cfg.target_specificity)
    if len(nd.normals) < need_thr + MIN_FIT_IMAGES:
        raise DataError(
            f"too few normal images to set a threshold: {len(nd.normals)} given; --target-specificity "
            f"{cfg.target_specificity} needs >= {need_thr} in the held-out slice plus >= {MIN_FIT_IMAGES} to fit"
        )
    fit_idx, thr_idx = _split_normals(nd.normals, cfg.threshold_fraction, cfg.seed)
    if len(thr_idx) < need_thr or len(fit_idx) < MIN_FIT_IMAGES:
        raise DataError(
            f"too few normal images to set a threshold: {len(thr_idx)} in the held-out slice "
            f"({cfg.threshold_fraction:.0%} of {len(nd.normals)} normal images, whole patients), "
            f"{len(fit_idx)} to fit; --target-specificity {cfg.target_specificity} needs >= {need_thr} held out "
            f"(raise --threshold-fraction, lower --target-specificity or add normal images)"
        )
    fit_ds, thr_ds = nd.normals.subset(fit_idx), nd.normals.subset(thr_idx)
    bar = progress or (lambda d, t: (lambda n=1: None))
    fit_x, fit_ds = decode_all(fit_ds, pp, strict=cfg.strict, progress=bar("decode fit", len(fit_ds)))
    thr_x, thr_ds = decode_all(thr_ds, pp, strict=cfg.strict, progress=bar("decode slice", len(thr_ds)))
    if len(thr_x) < need_thr:
        raise DataError(f"too few readable normal images in the threshold slice: {len(thr_x)} < {need_thr}")

    ctx = FitContext(preprocessing=pp, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress, log=log)
    detector.preprocessing = pp
    t0 = time.perf_counter()
    fit_report = detector.fit(fit_x, ctx) or {}
    fit_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    scores, maps = score_arrays(detector, thr_x, cfg.batch_size, bar("score slice", len(thr_x)))
    score_seconds = time.perf_counter() - t1
    if not np.all(np.isfinite(scores)):
        from cxrtool.errors import TrainingError

        raise TrainingError("the detector gave non-finite scores on the held-out normal images; nothing written")
    op = normal_threshold(scores, cfg.target_specificity)
    n_thr_pat = len(set(thr_ds.patients))
    op["chosen_on"] = f"held-out normal slice: {len(thr_x)} images of {n_thr_pat} patients (no abnormal images)"
    uses_labels = bool(detector.uses_abnormal_labels())
    meta = {
        "kind": CHECKPOINT_KIND,
        "detector": {"name": cfg.detector, "options": options, "describe": detector.describe()},
        "model": {"name": f"anomaly:{cfg.detector}", "options": options},
        "normal_class": nd.normal_class,
        "class_names": [nd.normal_class],  # what the detector was fitted on (for `cxrtool info`)
        "negative_class": nd.normal_class,
        "preprocessing": pp.to_dict(),
        "operating_point": op,
        "threshold_scores": [float(s) for s in np.sort(scores)],
        "threshold_stats": score_summary(scores),
        "heatmap_scale": heatmap_scale(maps),
        "detector_meta": detector.extra_meta(),
        "uses_abnormal_labels": uses_labels,
        "trained_on_normal_only": not uses_labels,
        "train_config": cfg.to_dict(),
        "data": {"source": str(cfg.data), "split": nd.split, "n_fit": int(len(fit_x)), "n_threshold": int(len(thr_x)),
                 "fit_patients": len(set(fit_ds.patients)), "threshold_patients": n_thr_pat,
                 "excluded": nd.excluded},
        "fit_report": fit_report,
    }
    run_dir = _run_dir(cfg)
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(run_dir / CHECKPOINT_NAME),
        "detector": cfg.detector,
        "describe": detector.describe(),
        "options": options,
        "normal_class": nd.normal_class,
        "n_fit": int(len(fit_x)),
        "n_threshold": int(len(thr_x)),
        "excluded": nd.excluded,
        "operating_point": op,
        "threshold_stats": meta["threshold_stats"],
        "trained_on_normal_only": not uses_labels,
        "fit_seconds": fit_seconds,
        "score_images_per_s": len(thr_x) / score_seconds if score_seconds > 0 else None,
        "fit_report": fit_report,
    }
    # everything goes to a hidden temporary folder first, then moves into place
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".part", dir=run_dir.parent))
    try:
        C.save(tmp / CHECKPOINT_NAME, detector.state_dict(), meta)
        write_json(tmp / "config.json", cfg.to_dict())
        write_json(tmp / "versions.json", versions())
        write_split_csv(tmp / "split.csv", {"fit": fit_ds, "threshold": thr_ds}, relative_to=run_dir)
        write_csv(tmp / "threshold_scores.csv",
                  [{"path": p, "score": float(s)} for p, s in zip(thr_ds.paths, scores)], ["path", "score"])
        history = fit_report.get("history") if isinstance(fit_report, dict) else None
        if history:
            write_csv(tmp / "metrics.csv", history)
        plot_score_histogram(tmp / "threshold_histogram.png", normal=scores, threshold=op["threshold"],
                             title=f"{cfg.detector}: held-out normal slice (n={len(scores)})",
                             normal_label="held-out normal (threshold slice)")
        write_json(tmp / "summary.json", summary)
        _move_into(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(run_dir)
    return summary


def _move_into(tmp: Path, run_dir: Path) -> None:
    if not run_dir.exists():
        os.replace(tmp, run_dir)
        return
    if not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a folder")
    for item in tmp.iterdir():
        os.replace(item, run_dir / item.name)
    tmp.rmdir()


def write_latest(run_dir: Path) -> None:
    from cxrtool.io import write_text

    base = _runs_dir()
    target = run_dir.name if run_dir.resolve().parent == base.resolve() else str(run_dir.resolve())
    write_text(base / LATEST_POINTER, target + "\n")


# ------------------------------------------------------------------------------------------------
# loading and scoring


@dataclass
class LoadedDetector:
    detector: Detector
    meta: dict[str, Any]
    path: Path

    @property
    def threshold(self) -> float:
        return float(self.meta["operating_point"]["threshold"])

    @property
    def preprocessing(self) -> Preprocessing:
        from cxrtool.imaging import Preprocessing

        return Preprocessing.from_dict(self.meta["preprocessing"])


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A file, a run folder, or (None) the latest ``anomaly train`` run."""
    from cxrtool import checkpoint as C

    if checkpoint is None:
        pointer = _runs_dir() / LATEST_POINTER
        if not pointer.is_file():
            raise CheckpointError(
                f"no --checkpoint given and no anomaly run in {_runs_dir()}/ (train one with `cxrtool anomaly train`)"
            )
        target = Path(pointer.read_text().strip())
        return C.resolve(target if target.is_absolute() else _runs_dir() / target)
    return C.resolve(checkpoint)


def load_detector(checkpoint: str | Path | None) -> LoadedDetector:
    """Load an anomaly checkpoint; any other kind (a classifier) is a one-line CheckpointError."""
    from cxrtool import checkpoint as C
    from cxrtool.imaging import Preprocessing

    path = resolve_checkpoint(checkpoint)
    meta = C.read_meta(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(
            f"{path} is a {meta.get('kind', 'unknown')} checkpoint, not an anomaly detector "
            "(train one with `cxrtool anomaly train`)"
        )
    det_meta = meta.get("detector") or {}
    try:
        spec = get_spec(det_meta["name"])
    except KeyError:
        raise CheckpointError(f"{path}: anomaly checkpoint without a detector name") from None
    except UsageError as exc:
        raise CheckpointError(f"{path}: {exc} (is the plugin that provides it installed?)") from None
    state = C.load_tensors(path)
    options = {**spec.options, **(det_meta.get("options") or {})}
    try:
        det = spec.build(**options)
        det.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        det.load_state(state, meta.get("detector_meta") or {})
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: cannot rebuild detector {det_meta['name']!r}: {first}") from None
    return LoadedDetector(det, meta, path)


def score_arrays(detector: Detector, images: np.ndarray, batch_size: int = 64,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and heatmaps of in-memory uint8 images, in batches."""
    scores, maps = [], []
    for s in range(0, len(images), batch_size):
        sc, hm = detector.score(images[s : s + batch_size])
        scores.append(np.asarray(sc, dtype=np.float64))
        maps.append(np.asarray(hm, dtype=np.float32))
        if progress:
            progress(len(sc))
    if not scores:
        return np.empty(0), np.empty((0, 0, 0), np.float32)
    return np.concatenate(scores), np.concatenate(maps)


@dataclass
class ScoredSet:
    scores: np.ndarray  # (N_kept,)
    kept: np.ndarray  # indices into the input set
    peaks: np.ndarray  # (N_kept, 2) heatmap argmax (row, col) at model-input resolution
    failures: list[tuple[int, str]]


def score_set(loaded: LoadedDetector, ds: ImageSet, *, batch_size: int = 64, strict: bool = False,
              progress: Callable[[int], None] | None = None,
              on_batch: Callable[[np.ndarray, list[int], np.ndarray, np.ndarray], None] | None = None) -> ScoredSet:
    """Stream ``ds`` through the detector (decoding overlaps scoring). ``on_batch(images, indices,
    scores, heatmaps)`` sees each batch, e.g. to write overlays, without holding all maps."""
    from cxrtool.data import checked_batches

    scores, kept, peaks, failures = [], [], [], []
    for arr, idx, bad in checked_batches(ds, loaded.preprocessing, batch_size, failures, strict=strict):
        if len(idx):
            sc, hm = loaded.detector.score(arr)
            sc = np.asarray(sc, dtype=np.float64)
            flat = hm.reshape(len(hm), -1).argmax(axis=1)
            peaks.append(np.stack([flat // hm.shape[2], flat % hm.shape[2]], axis=1))
            scores.append(sc)
            kept.extend(idx)
            if on_batch:
                on_batch(arr, idx, sc, hm)
        if progress:
            progress(len(idx) + len(bad))
    if not kept:
        raise DataError("none of the images could be read")
    return ScoredSet(np.concatenate(scores), np.asarray(kept, np.int64), np.concatenate(peaks), failures)


# ------------------------------------------------------------------------------------------------
# metrics, figures and overlays


def image_metrics(is_abnormal: np.ndarray, scores: np.ndarray, threshold: float | None,
                  control_permutations: int = 200, seed: int = 0) -> dict[str, Any]:
    """AUROC, average precision, sensitivity / specificity at ``threshold`` (abnormal: score >=
    threshold), and a shuffled-label control (AUROC of the same scores against permuted labels)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(is_abnormal, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_abn, n_norm = int(y.sum()), int((~y).sum())
    both = n_abn > 0 and n_norm > 0
    out: dict[str, Any] = {"n": int(y.size), "n_abnormal": n_abn, "n_normal": n_norm,
                           "auroc": float(roc_auc_score(y, s)) if both else None,
                           "average_precision": float(average_precision_score(y, s)) if both else None,
                           "prevalence": n_abn / y.size if y.size else None}
    if threshold is not None:
        pred = s >= threshold
        tp, fn = int((pred & y).sum()), int((~pred & y).sum())
        fp, tn = int((pred & ~y).sum()), int((~pred & ~y).sum())
        out.update({
            "threshold": float(threshold),
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None,
            "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
        })
    if both and control_permutations:
        rng = np.random.default_rng(seed)
        aucs = [roc_auc_score(rng.permutation(y), s) for _ in range(control_permutations)]
        out["shuffled_label_control"] = {"auroc_mean": float(np.mean(aucs)), "auroc_std": float(np.std(aucs)),
                                         "auroc_min": float(np.min(aucs)), "auroc_max": float(np.max(aucs)),
                                         "permutations": control_permutations, "seed": seed}
    return out


def plot_score_histogram(path: str | os.PathLike, normal: np.ndarray, abnormal: np.ndarray | None = None,
                         threshold: float | None = None, reference: np.ndarray | None = None,
                         title: str | None = None, normal_label: str = "normal",
                         abnormal_label: str = "abnormal") -> Path:
    """Score histograms of normal (and abnormal) images, the threshold, and optionally the
    threshold slice's score distribution as an outline (``reference``)."""
    from cxrtool.io import save_figure
    from cxrtool.report import _pyplot

    plt = _pyplot()
    groups = [np.asarray(normal, np.float64)] + ([np.asarray(abnormal, np.float64)] if abnormal is not None else [])
    values = np.concatenate([g for g in groups if g.size] + ([np.asarray(reference, np.float64)] if reference is not None else []))
    lo, hi = np.quantile(values, [0.0, 0.995]) if values.size else (0.0, 1.0)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if not hi > lo:
        hi = lo + 1.0
    pad = 0.03 * (hi - lo)
    bins = np.linspace(lo - pad, hi + pad, 41)
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    clipped = lambda v: np.clip(v, bins[0], bins[-1])  # noqa: E731  (outliers go to the last bin)
    ax.hist(clipped(groups[0]), bins=bins, alpha=0.55, color="C0", edgecolor="white",
            label=f"{normal_label} (n={groups[0].size})", density=abnormal is not None)
    if abnormal is not None:
        ax.hist(clipped(groups[1]), bins=bins, alpha=0.55, color="C3", edgecolor="white",
                label=f"{abnormal_label} (n={groups[1].size})", density=True)
    if reference is not None and len(reference):
        ax.hist(clipped(np.asarray(reference)), bins=bins, histtype="step", color="black", linewidth=1.2,
                linestyle=":", label=f"threshold slice (normal, n={len(reference)})", density=abnormal is not None)
    if threshold is not None:
        ax.axvline(float(threshold), color="black", linestyle="--", linewidth=1.4, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score (higher = less like the normal training images)")
    ax.set_ylabel("density" if abnormal is not None else "images")
    ax.legend(fontsize=8.5)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "anomaly scores")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def overlay_image(image: np.ndarray, heatmap: np.ndarray, scale: tuple[float, float] | list[float],
                  caption: str | None = None, min_side: int = 256):
    """PIL RGB panel: the image (left) and the heatmap over it (right); any (H, W), NaN = no map.

    Colour starts at ``scale[0]`` (transparent below: the normal slice's 90th percentile) and is full
    at ``scale[1]`` (the normal slice's 99.9th percentile) or at this image's own maximum when that is
    higher, so a very abnormal image still shows where it is most abnormal instead of one flat blob."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    heatmap = np.asarray(heatmap, np.float32)
    lo, hi = float(scale[0]), max(float(scale[1]), float(np.nanmax(heatmap)))
    t = np.nan_to_num(np.clip((heatmap - lo) / max(hi - lo, 1e-12), 0.0, 1.0), nan=0.0)
    grey = np.asarray(image, dtype=np.uint8)
    colour = colormaps["inferno"](np.rint(t * 255).astype(np.uint8), bytes=True)[..., :3]  # 256-entry lookup
    alpha = ((0.15 + 0.7 * t) * (t > 0.02))[..., None]
    blend = grey[..., None] * (1 - alpha) + colour * alpha
    left = Image.fromarray(grey).convert("RGB")
    right = Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8))
    h, w = image.shape
    k = max(1, math.ceil(min_side / max(h, w)))
    left = left.resize((w * k, h * k), Image.Resampling.BILINEAR)
    right = right.resize((w * k, h * k), Image.Resampling.BILINEAR)
    font_px = max(11, round(w * k / 40))  # legible on a 2 x 256 px panel and on a 2 x 1024 px one
    bar_h = round(font_px * 1.6) if caption else 0
    panel = Image.new("RGB", (2 * w * k + 4, h * k + bar_h), (255, 255, 255))
    panel.paste(left, (0, bar_h))
    panel.paste(right, (w * k + 4, bar_h))
    if caption:
        font = ImageFont.load_default(size=font_px)
        ImageDraw.Draw(panel).text((4, round(font_px * 0.3)), caption, fill=(0, 0, 0), font=font)
    return panel


def write_overlay(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray, scale, caption: str | None = None) -> Path:
    from cxrtool.io import atomic_path

    panel = overlay_image(image, heatmap, scale, caption)
    with atomic_path(path) as tmp:
        panel.save(tmp, format="PNG")
    return Path(path)


def pointing_game(peaks: np.ndarray, lesions: list[list[dict[str, float]]], tolerance: float = 0.0) -> dict[str, Any]:
    """Share of images whose heatmap maximum (row, col) lies in one of their lesion discs (radius +
    ``tolerance`` pixels); images without lesions are not counted."""
    hits, n = 0, 0
    for (r, c), les in zip(peaks, lesions):
        if not les:
            continue
        n += 1
        if any((c - d["x"]) ** 2 + (r - d["y"]) ** 2 <= (d["r"] + tolerance) ** 2 for d in les):
            hits += 1
    return {"hits": hits, "n": n, "hit_rate": hits / n if n else None, "tolerance_px": tolerance}
