"""Datasets: a folder per class, a CSV manifest or a MedMNIST ``.npz``; patient-aware splits; the cache.

Supported ``--data`` layouts:

* **folders**: ``ROOT/<CLASS>/*.png`` (class names from folder names, sorted), optionally inside
  ``ROOT/{train,val,test}/`` — the Kermany layout.
* **CSV manifest**: columns ``path,label`` and optionally ``patient_id`` and ``split``
  (train / val / test); paths are relative to the CSV file.
* **MedMNIST .npz**: ``{train,val,test}_images`` (N, H, W) uint8 and ``*_labels``.

Labels come from the folder / ``label`` column by default. ``--labels kermany-subtype`` derives
``normal`` / ``bacteria`` / ``virus`` from Kermany file names (``person12_bacteria_45.jpeg``);
``--labels column:NAME`` takes another CSV column.

Patient ids: a CSV ``patient_id`` column, else parsed from Kermany names
(``person123_*`` -> ``person123``, ``IM-0115-0001`` -> ``IM-0115``,
``NORMAL2-IM-1158-0001`` -> ``NORMAL2-IM-1158``), else each image is its own patient.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrtool.errors import DataError, ImageReadError, UsageError
from cxrtool.imaging import Preprocessing, load, preprocess

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
SPLIT_NAMES = ("train", "val", "test")
KERMANY_SUBTYPES = ("normal", "bacteria", "virus")


class DataWarning(UserWarning):
    """Something in the data was skipped or looks wrong; the message names it."""


@dataclass
class ImageSet:
    """Images with labels (indices into ``class_names``) and patient ids.

    ``paths`` are file paths, or ``npz://FILE#split/index`` references into ``arrays``.
    """

    paths: list[str]
    labels: np.ndarray  # int64 (N,), -1 where unknown
    class_names: list[str]
    patients: list[str]
    arrays: np.ndarray | None = None  # (N, H, W) uint8 for in-memory sources
    has_patient_ids: bool = True
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int] | np.ndarray) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            patients=[self.patients[i] for i in idx],
            arrays=None if self.arrays is None else self.arrays[idx],
            has_patient_ids=self.has_patient_ids,
            extra={k: [v[i] for i in idx] for k, v in self.extra.items()},
        )

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}

    def with_classes(self, class_names: list[str]) -> ImageSet:
        """Re-index labels onto ``class_names`` (e.g. a checkpoint's order); unknown labels are an error."""
        mapping = {}
        for i, name in enumerate(self.class_names):
            if name not in class_names and (self.labels == i).any():
                raise DataError(
                    f"the data has class {name!r} which the model does not know (model classes: "
                    f"{', '.join(class_names)})"
                )
            mapping[i] = class_names.index(name) if name in class_names else -1
        labels = np.array([mapping.get(int(label), -1) for label in self.labels], dtype=np.int64)
        out = self.subset(np.arange(len(self)))
        out.labels, out.class_names = labels, list(class_names)
        return out


# -- patient ids and Kermany names ---------------------------------------------------------------
_KERMANY_PATIENT = [
    re.compile(r"^(person\d+)_", re.I),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.I),
    re.compile(r"^(IM-\d+)-\d+", re.I),
]


def kermany_patient(path: str) -> str | None:
    """``person1000_bacteria_2931.jpeg`` -> ``person1000``; ``IM-0115-0001.jpeg`` -> ``IM-0115``."""
    name = Path(path).name
    for rx in _KERMANY_PATIENT:
        m = rx.match(name)
        if m:
            return m.group(1)
    return None


def kermany_subtype(path: str, folder_label: str | None = None) -> str | None:
    """normal / bacteria / virus from a Kermany file name (and its NORMAL folder)."""
    name = Path(path).name.lower()
    if "bacteria" in name:
        return "bacteria"
    if "virus" in name:
        return "virus"
    if (folder_label or "").lower() == "normal" or name.startswith(("im-", "normal2-")):
        return "normal"
    return None


# -- loading ------------------------------------------------------------------------------------
def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _finish(paths, raw_labels, patients, label_mode, class_names=None, extra=None) -> ImageSet:
    """Turn raw string labels into an ImageSet, applying ``label_mode``."""
    labels_s: list[str | None] = list(raw_labels)
    if label_mode == "kermany-subtype":
        labels_s = [kermany_subtype(p, lab) for p, lab in zip(paths, labels_s)]
        bad = [p for p, lab in zip(paths, labels_s) if lab is None]
        if bad:
            raise DataError(
                f"--labels kermany-subtype: {len(bad)} file name(s) name no subtype (bacteria/virus) and are "
                f"not in a NORMAL folder, e.g. {bad[0]}"
            )
    names = class_names or sorted({lab for lab in labels_s if lab is not None})
    if label_mode == "kermany-subtype" and not class_names:
        names = [s for s in KERMANY_SUBTYPES if s in set(labels_s)]
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index.get(lab, -1) if lab is not None else -1 for lab in labels_s], dtype=np.int64)
    parsed = [pt if pt else kermany_patient(p) for p, pt in zip(paths, patients)]
    has_ids = all(parsed)
    parsed = [pt or f"img:{p}" for p, pt in zip(paths, parsed)]
    return ImageSet(list(map(str, paths)), labels, names, parsed, has_patient_ids=has_ids, extra=extra or {})


def _from_folders(root: Path, label_mode: str) -> ImageSet:
    paths, labels = [], []
    for d in _class_dirs(root):
        files = _list_images(d)
        if not files:
            warnings.warn(f"class folder {d} has no images; class {d.name!r} ignored", DataWarning, stacklevel=3)
        for f in files:
            paths.append(f)
            labels.append(d.name)
    if not paths:
        raise DataError(f"{root}: no images found in class sub-folders (expected ROOT/<CLASS>/*.png)")
    return _finish(paths, labels, [None] * len(paths), label_mode)


def _from_csv(path: Path, label_mode: str) -> dict[str, ImageSet]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV manifest {path}: {exc}") from None
    if not rows:
        raise DataError(f"CSV manifest {path} has no rows")
    column = "label"
    if label_mode.startswith("column:"):
        column, label_mode = label_mode.split(":", 1)[1], "folder"
    for needed in ("path", column):
        if needed not in rows[0]:
            raise DataError(f"CSV manifest {path} has no {needed!r} column (columns: {', '.join(rows[0])})")
    base = path.parent
    groups: dict[str, list[dict]] = {}
    for row in rows:
        split = (row.get("split") or "all").strip() or "all"
        groups.setdefault(split, []).append(row)
    names = sorted({(r[column] or "").strip() for r in rows if (r[column] or "").strip()})
    if label_mode == "kermany-subtype":
        names = None
    out = {}
    for split, rs in groups.items():
        paths = [str(base / r["path"]) for r in rs]
        labels = [(r[column] or "").strip() or None for r in rs]
        patients = [(r.get("patient_id") or "").strip() or None for r in rs]
        out[split] = _finish(paths, labels, patients, label_mode, class_names=names)
    if label_mode == "kermany-subtype":  # one class order across splits
        allnames = [s for s in KERMANY_SUBTYPES if any(s in v.class_names for v in out.values())]
        out = {k: v.with_classes(allnames) for k, v in out.items()}
    return out


def _from_npz(path: Path, class_names: list[str] | None) -> dict[str, ImageSet]:
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:
        raise DataError(f"cannot read {path} as a .npz archive: {exc}") from None
    out = {}
    for split in SPLIT_NAMES:
        if f"{split}_images" not in keys:
            continue
        images = data[f"{split}_images"]
        if images.ndim == 4:  # (N, H, W, C) colour MedMNIST variants
            images = images.mean(axis=-1).astype(np.uint8)
        labels = data[f"{split}_labels"].reshape(len(images), -1)[:, 0].astype(np.int64)
        n_classes = int(labels.max()) + 1
        names = class_names or (
            ["normal", "pneumonia"] if "pneumonia" in path.name.lower() else [f"class{i}" for i in range(n_classes)]
        )
        refs = [f"npz://{path}#{split}/{i}" for i in range(len(images))]
        out[split] = ImageSet(
            refs, labels, list(names), refs, arrays=np.ascontiguousarray(images, dtype=np.uint8), has_patient_ids=False
        )
    if not out:
        raise DataError(f"{path}: no '<split>_images' arrays (expected MedMNIST layout, e.g. train_images)")
    return out


def load_splits(data: str | Path, labels: str = "folder", class_names: list[str] | None = None) -> dict[str, ImageSet]:
    """Load ``data`` into named splits: ``train``/``val``/``test`` when the source has them, else ``all``.

    ``labels``: ``folder`` (default), ``kermany-subtype`` or ``column:NAME`` (CSV only).
    """
    if labels not in ("folder", "kermany-subtype") and not labels.startswith("column:"):
        raise UsageError(f"--labels must be folder, kermany-subtype or column:NAME, got {labels!r}")
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _from_csv(path, labels)
        if path.suffix.lower() == ".npz":
            return _from_npz(path, class_names)
        raise DataError(f"--data {path}: expected a folder, a .csv manifest or a .npz archive")
    subdirs = {d.name.lower(): d for d in _class_dirs(path)}
    if labels.startswith("column:"):
        raise UsageError("--labels column:NAME needs a CSV manifest")
    if subdirs and set(subdirs) <= set(SPLIT_NAMES):
        splits = {name: _from_folders(d, labels) for name, d in subdirs.items()}
        allnames = sorted({n for s in splits.values() for n in s.class_names})
        if labels == "kermany-subtype":
            allnames = [s for s in KERMANY_SUBTYPES if s in allnames]
        return {k: v.with_classes(allnames) for k, v in splits.items()}
    if not subdirs:
        raise DataError(f"--data {path}: the folder has no class sub-folders (expected ROOT/<CLASS>/*.png)")
    return {"all": _from_folders(path, labels)}


def check_classes(ds: ImageSet, what: str = "training data") -> None:
    """At least two classes with images; classes without images are an error."""
    counts = ds.counts()
    if (ds.labels < 0).any():
        raise DataError(f"{what}: {int((ds.labels < 0).sum())} image(s) have no label")
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise DataError(f"{what}: class(es) {', '.join(empty)} have no images")
    if len(counts) < 2:
        raise DataError(f"{what}: only one class ({', '.join(counts) or 'none'}); a classifier needs at least two")


# -- splits -------------------------------------------------------------------------------------
def patient_split(ds: ImageSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split keeping each patient's images on one side. Returns (keep_idx, held_out_idx)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < fraction < 1:
        raise UsageError(f"split fraction must be between 0 and 1, got {fraction}")
    n_splits = max(2, round(1 / fraction))
    groups = np.array(ds.patients)
    if len(set(groups)) < n_splits:
        raise DataError(f"only {len(set(groups))} patients: too few to hold out {fraction:.0%} of them")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only N members"
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        keep, held = next(splitter.split(np.zeros(len(ds)), ds.labels, groups))
    return np.sort(keep), np.sort(held)


def write_split_csv(path: Path, parts: dict[str, ImageSet], relative_to: Path | None = None) -> Path:
    """Save which image went to which split (``path,label,patient_id,split``)."""
    from cxrtool.io import write_csv

    base = relative_to or path.parent
    rows = []
    for split, ds in parts.items():
        for p, lab, pt in zip(ds.paths, ds.labels, ds.patients):
            shown = p if p.startswith("npz://") else os.path.relpath(Path(p).resolve(), base.resolve())
            rows.append({"path": shown, "label": ds.class_names[lab] if lab >= 0 else "", "patient_id": pt, "split": split})
    return write_csv(path, rows, ["path", "label", "patient_id", "split"])


# -- decoding cache -----------------------------------------------------------------------------
def default_cache_dir() -> Path | None:
    env = os.environ.get("CXRTOOL_CACHE_DIR")
    if env == "":
        return None
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrtool" / "images"


def _cache_key(paths: list[str], pp: Preprocessing) -> str:
    h = hashlib.sha256(json.dumps(pp.to_dict(), sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:32]


def decode_all(
    ds: ImageSet,
    pp: Preprocessing,
    *,
    strict: bool = False,
    workers: int | None = None,
    cache_dir: Path | None | str = "default",
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, ImageSet]:
    """Decode and preprocess every image once: returns (uint8 (N, size, size), the images kept).

    Unreadable files are skipped with a :class:`DataWarning` naming them (or raise with ``strict``).
    With a cache dir, the decoded array is stored under a key of the paths, their sizes and mtimes
    and the preprocessing, so the next run over the same data skips decoding altogether.
    """
    if len(ds) == 0:
        raise DataError("no images to decode")
    if ds.arrays is not None:
        arr = np.stack([preprocess(a.astype(np.float32) / 255.0, pp) for a in ds.arrays])
        if progress:
            progress(len(ds))
        return arr, ds
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    key = _cache_key(ds.paths, pp) if cache else None
    if cache and (cache / f"{key}.npy").is_file():
        try:
            arr = np.load(cache / f"{key}.npy")
            failed = json.loads((cache / f"{key}.json").read_text())["failed"]
        except Exception:  # a damaged cache entry is rebuilt below
            pass
        else:
            if failed and strict:
                raise ImageReadError(failed[0][1])
            for _, msg in failed:
                warnings.warn(f"skipped unreadable image {msg}", DataWarning, stacklevel=2)
            keep = np.setdiff1d(np.arange(len(ds)), [i for i, _ in failed])
            if progress:
                progress(len(ds))
            return arr, ds.subset(keep)

    out = np.empty((len(ds), pp.size, pp.size), dtype=np.uint8)
    failed: list[tuple[int, str]] = []

    def work(i: int) -> None:
        try:
            out[i] = load(ds.paths[i], pp)
        except ImageReadError as exc:
            failed.append((i, str(exc)))

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, range(len(ds))):
            if progress:
                progress(1)
    failed.sort()
    if failed and strict:
        raise ImageReadError(failed[0][1] + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    for _, msg in failed:
        warnings.warn(f"skipped unreadable image {msg}", DataWarning, stacklevel=2)
    keep = np.setdiff1d(np.arange(len(ds)), [i for i, _ in failed])
    if len(keep) == 0:
        raise DataError("none of the images could be read")
    arr = out[keep]
    if cache:
        from cxrtool.io import atomic_path, write_json

        try:
            cache.mkdir(parents=True, exist_ok=True)
            write_json(cache / f"{key}.json", {"failed": failed, "n": len(ds), "preprocessing": pp.to_dict()})
            with atomic_path(cache / f"{key}.npy") as tmp:
                np.save(tmp, arr)
        except OSError as exc:
            warnings.warn(f"could not write the image cache in {cache}: {exc}", DataWarning, stacklevel=2)
    return arr, ds.subset(keep)


def iter_batches(ds: ImageSet, pp: Preprocessing, batch_size: int, workers: int | None = None) -> Iterable[tuple[np.ndarray, list[int], list[tuple[int, str]]]]:
    """Stream (uint8 batch, indices kept, failures) without holding the whole set in memory.

    Decoding of the next batch overlaps with whatever the caller does with the current one.
    """
    if ds.arrays is not None:
        for start in range(0, len(ds), batch_size):
            idx = list(range(start, min(start + batch_size, len(ds))))
            yield np.stack([preprocess(ds.arrays[i].astype(np.float32) / 255.0, pp) for i in idx]), idx, []
        return

    def one(i: int):
        try:
            return i, load(ds.paths[i], pp), None
        except ImageReadError as exc:
            return i, None, str(exc)

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = [list(range(s, min(s + batch_size, len(ds)))) for s in range(0, len(ds), batch_size)]
        pending = pool.map(one, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            results = list(pending)
            pending = pool.map(one, chunks[k + 1]) if k + 1 < len(chunks) else None
            ok = [(i, a) for i, a, e in results if e is None]
            bad = [(i, e) for i, a, e in results if e is not None]
            arr = np.stack([a for _, a in ok]) if ok else np.empty((0, pp.size, pp.size), np.uint8)
            yield arr, [i for i, _ in ok], bad


def checked_batches(ds: ImageSet, pp: Preprocessing, batch_size: int, failures: list[tuple[int, str]], *,
                    strict: bool = False, workers: int | None = None
                    ) -> Iterable[tuple[np.ndarray, list[int], list[tuple[int, str]]]]:
    """:func:`iter_batches` for inference: an unreadable image raises (``strict``) or is skipped with a
    warning that names it and recorded in ``failures``."""
    for arr, idx, bad in iter_batches(ds, pp, batch_size, workers=workers):
        if bad and strict:
            raise ImageReadError(bad[0][1])
        for _, msg in bad:
            warnings.warn(f"skipped unreadable image {msg}", DataWarning, stacklevel=3)
        failures.extend(bad)
        yield arr, idx, bad


def gather_images(inputs: Iterable[str | Path]) -> list[str]:
    """Expand files and folders (recursively) into a sorted list of image files."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _list_images(p)
            if not found:
                warnings.warn(f"{p}: folder holds no images", DataWarning, stacklevel=2)
            out.extend(map(str, found))
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError("no images given")
    return out
