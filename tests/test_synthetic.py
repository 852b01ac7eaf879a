"""Synthetic chest X-ray phantoms and datasets (cxrtool.synthetic)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtool.errors import UsageError
from cxrtool.synthetic import (
    MANIFEST_COLUMNS,
    PATTERNS,
    lesion_mask,
    make_arrays,
    parse_lesions,
    phantom,
    write_dataset,
)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# phantom


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("lesion", [False, True])
def test_phantom_shape_dtype_range(size, lesion):
    img, info = phantom(size, np.random.default_rng(3), lesion=lesion)
    assert img.shape == (size, size) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.1  # real structure, not a flat image
    assert info["mask"].shape == (size, size) and info["mask"].dtype == bool
    assert info["lungs"].shape == (size, size) and info["lungs"].dtype == bool
    assert 0.1 < info["lungs"].mean() < 0.5
    if lesion:
        assert len(info["lesions"]) == 1 and info["mask"].any()
        les = info["lesions"][0]
        assert set(les) == {"x", "y", "r"} and 0 <= les["x"] < size and 0 <= les["y"] < size
    else:
        assert info["lesions"] == [] and not info["mask"].any()


def test_phantom_looks_like_a_chest_x_ray():
    """Air dark, lungs darker than the mediastinum / spine, ribs brighten the lungs periodically."""
    size = 128
    for seed in range(10):
        img, info = phantom(size, np.random.default_rng(seed))
        lungs = info["lungs"]
        corners = np.concatenate([img[:8, :8].ravel(), img[:8, -8:].ravel()])
        midline = img[20:90, size // 2 - 3 : size // 2 + 3]
        assert corners.mean() < img[lungs].mean() < midline.mean()
        assert (img[lungs] < 0.7).mean() > 0.9
        assert lungs[:, : size // 2].any() and lungs[:, size // 2 :].any()  # two lung fields


def test_phantom_deterministic():
    for pattern in PATTERNS:
        a, ia = phantom(64, np.random.default_rng(7), lesion=True, pattern=pattern)
        b, ib = phantom(64, np.random.default_rng(7), lesion=True, pattern=pattern)
        assert np.array_equal(a, b) and ia["lesions"] == ib["lesions"]
        assert np.array_equal(ia["mask"], ib["mask"])
    c, _ = phantom(64, np.random.default_rng(8), lesion=True)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lesions_inside_lungs_and_brighter(pattern):
    size = 96
    for seed in range(15):
        img, info = phantom(size, np.random.default_rng(seed), lesion=True, pattern=pattern)
        mask, lungs, lesions = info["mask"], info["lungs"], info["lesions"]
        assert mask.any()
        assert not (mask & ~lungs).any(), "lesion pixels outside the lung fields"
        assert np.array_equal(mask, lesion_mask(size, lesions) & lungs)
        if pattern == "focal":
            (les,) = lesions
            assert 0.03 * size <= les["r"] <= 0.10 * size
            # the whole disc lies inside a lung, not only its clipped part
            assert not (lesion_mask(size, lesions) & ~lungs).any()
        elif pattern == "lobar":
            assert len(lesions) == 1 and lesions[0]["r"] >= 0.07 * size
        else:
            assert 4 <= len(lesions) <= 7
            xs = [les["x"] for les in lesions]
            assert min(xs) < size / 2 < max(xs), "diffuse opacities should be bilateral"
        # brighter than the surrounding lung (a ring from r to 2r around each lesion)
        yy, xx = np.mgrid[:size, :size]
        ring = np.zeros_like(mask)
        for les in lesions:
            d = np.hypot(xx - les["x"], yy - les["y"])
            ring |= (d > les["r"]) & (d <= 2 * les["r"])
        ring &= lungs & ~mask
        assert ring.sum() > 10
        assert img[mask].mean() > img[ring].mean() + 0.02


def test_unknown_pattern_and_tiny_size_rejected():
    with pytest.raises(UsageError, match="pattern"):
        phantom(64, np.random.default_rng(0), lesion=True, pattern="cavity")
    with pytest.raises(UsageError):
        phantom(8, np.random.default_rng(0))


def test_module_does_not_import_torch():
    code = "import sys, cxrtool.synthetic; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# write_dataset


def test_write_dataset_folders_layout(tmp_path):
    root = write_dataset(tmp_path / "ds", n_per_class=9, size=32, seed=1)
    assert root == tmp_path / "ds"
    fields, rows = _read_csv(root / "labels.csv")
    assert fields == list(MANIFEST_COLUMNS)
    assert len(rows) == 18 and Counter(r["label"] for r in rows) == {"NORMAL": 9, "LESION": 9}
    assert sorted(p.name for p in root.iterdir()) == ["LESION", "NORMAL", "labels.csv"]
    assert not [p for p in root.rglob("*") if ".part" in p.name], "temporary files left behind"

    images_of = defaultdict(list)
    for row in rows:
        path = root / row["path"]
        assert row["path"] == f"{row['label']}/{path.name}" and path.is_file()
        assert re.fullmatch(r"synth\d{4}", row["patient_id"])
        assert re.fullmatch(rf"{row['patient_id']}_\d+\.png", path.name)
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (32, 32) and im.format == "PNG"
        images_of[row["patient_id"]].append(row)
        lesions = parse_lesions(row)
        if row["label"] == "NORMAL":
            assert row["lesion_x"] == row["lesion_y"] == row["lesion_r"] == "" and lesions == []
        else:
            assert len(lesions) == 1 and 0 <= lesions[0]["x"] < 32 and lesions[0]["r"] > 0
    # patients have 1-3 images, all of one class; there is at least one patient with several
    assert all(1 <= len(v) <= 3 for v in images_of.values())
    assert all(len({r["label"] for r in v}) == 1 for v in images_of.values())
    assert max(len(v) for v in images_of.values()) > 1
    assert len(images_of) < 18
    assert len({r["path"] for r in rows}) == 18


def test_write_dataset_pixels_match_make_arrays(tmp_path):
    root = write_dataset(tmp_path, n_per_class=3, size=48, seed=4)
    images, labels, infos = make_arrays(n_per_class=3, size=48, seed=4)
    _, rows = _read_csv(root / "labels.csv")
    for row, img, label, info in zip(rows, images, labels, infos, strict=True):
        on_disk = np.asarray(Image.open(root / row["path"]), dtype=np.float32) / 255.0
        assert np.abs(on_disk - img).max() <= 0.5 / 255 + 1e-6
        assert row["label"] == ("NORMAL", "LESION")[label]
        assert parse_lesions(row) == [{k: float(v) for k, v in les.items()} for les in info["lesions"]]


def test_write_dataset_deterministic(tmp_path):
    a = _tree_bytes(write_dataset(tmp_path / "a", n_per_class=5, size=32, seed=3))
    b = _tree_bytes(write_dataset(tmp_path / "b", n_per_class=5, size=32, seed=3))
    c = _tree_bytes(write_dataset(tmp_path / "c", n_per_class=5, size=32, seed=4))
    assert a == b
    assert a != c


def test_write_dataset_val_split_is_patient_level(tmp_path):
    root = write_dataset(tmp_path, n_per_class=12, size=32, seed=2, val_fraction=0.25)
    fields, rows = _read_csv(root / "labels.csv")
    assert fields == [*MANIFEST_COLUMNS, "split"]
    splits = defaultdict(set)
    for row in rows:
        assert row["path"].startswith(f"{row['split']}/{row['label']}/") and (root / row["path"]).is_file()
        splits[row["patient_id"]].add(row["split"])
    assert all(len(s) == 1 for s in splits.values()), "a patient is in both splits"
    for label in ("NORMAL", "LESION"):
        counts = Counter(r["split"] for r in rows if r["label"] == label)
        assert counts["train"] > 0 and counts["val"] > 0 and sum(counts.values()) == 12


def test_write_dataset_flat_layout(tmp_path):
    root = write_dataset(tmp_path, n_per_class=4, size=32, layout="flat")
    _, rows = _read_csv(root / "labels.csv")
    assert len(rows) == 8 and all(r["path"].startswith("images/") for r in rows)
    assert sorted(p.name for p in root.iterdir()) == ["images", "labels.csv"]


def test_write_dataset_three_classes(tmp_path):
    classes = ("NORMAL", "BACTERIA", "VIRUS")
    root = write_dataset(tmp_path, n_per_class=6, size=64, seed=5, classes=classes)
    _, rows = _read_csv(root / "labels.csv")
    assert Counter(r["label"] for r in rows) == {c: 6 for c in classes}
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(classes)
    for row in rows:
        lesions = parse_lesions(row)
        if row["label"] == "NORMAL":
            assert lesions == []
        elif row["label"] == "BACTERIA":  # one large dense consolidation
            assert len(lesions) == 1 and lesions[0]["r"] >= 0.07 * 64
            assert ";" not in row["lesion_x"]
        else:  # several small patches in both lungs
            assert len(lesions) >= 4 and all(les["r"] < 0.07 * 64 for les in lesions)
            assert row["lesion_x"].count(";") == len(lesions) - 1


def test_write_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="valid classes"):
        write_dataset(tmp_path, n_per_class=2, classes=("NORMAL", "TUMOUR"))
    with pytest.raises(UsageError, match="layout"):
        write_dataset(tmp_path, n_per_class=2, layout="zip")
    with pytest.raises(UsageError):
        write_dataset(tmp_path, n_per_class=2, val_fraction=1.0)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# learnability: a simple blob detector + logistic regression separates the classes on held-out data


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n)
    w = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _downsample(images: np.ndarray, side: int = 16) -> np.ndarray:
    n, size, _ = images.shape
    k = size // side
    return images.reshape(n, side, k, side, k).mean((2, 4)).reshape(n, -1)


def _blob_features(images: np.ndarray, infos: list[dict]) -> np.ndarray:
    """Difference-of-Gaussians responses at three scales inside each lung: max, percentiles, spread."""
    n, size, _ = images.shape
    lungs = np.stack([info["lungs"] for info in infos])
    feats = []
    for sigma in (size / 40, size / 25, size / 16):
        a, b = _gauss_matrix(size, sigma), _gauss_matrix(size, 2.5 * sigma)
        dog = a @ images @ a.T - b @ images @ b.T
        for cols in (slice(None), slice(0, size // 2), slice(size // 2, None)):
            r = np.where(lungs[:, :, cols], dog[:, :, cols], np.nan).reshape(n, -1)
            feats += [np.nanmax(r, 1), np.nanpercentile(r, 99, axis=1), np.nanpercentile(r, 90, axis=1)]
            feats.append(np.nanstd(r, 1))
    return np.stack(feats, 1)


@pytest.mark.parametrize(
    ("classes", "min_accuracy"),
    [(("NORMAL", "LESION"), 0.8), (("NORMAL", "BACTERIA", "VIRUS"), 0.7)],
)
def test_classes_are_separable_on_held_out_phantoms(classes, min_accuracy):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, i_train = make_arrays(n_per_class=100, size=64, seed=0, classes=classes)
    x_test, y_test, i_test = make_arrays(n_per_class=100, size=64, seed=1, classes=classes)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    model.fit(_blob_features(x_train, i_train), y_train)
    accuracy = model.score(_blob_features(x_test, i_test), y_test)
    assert accuracy > min_accuracy, f"held-out accuracy {accuracy:.3f}"
    # ... and the task is not trivial: raw downsampled pixels with the same classifier do much worse
    if len(classes) == 2:
        raw = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        raw.fit(_downsample(x_train), y_train)
        assert raw.score(_downsample(x_test), y_test) < accuracy


def test_parse_lesions_rejects_malformed_rows():
    from cxrtool.errors import DataError

    assert parse_lesions({"lesion_x": "", "lesion_y": "", "lesion_r": ""}) == []
    assert parse_lesions({"lesion_x": "1;2", "lesion_y": "3;4", "lesion_r": "5;6"})[1] == {
        "x": 2.0,
        "y": 4.0,
        "r": 6.0,
    }
    with pytest.raises(DataError):
        parse_lesions({"path": "a.png", "lesion_x": "1;2", "lesion_y": "3", "lesion_r": "5"})
