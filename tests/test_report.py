"""Report figures and tables: files appear whole, open as images and leave no temporary files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrtool import report
from cxrtool.errors import DataError

NAMES3 = ["NORMAL", "BACTERIA", "VIRUS"]


def _probs(n: int = 60, c: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.5
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def _check_png(folder, name: str) -> None:
    path = folder / name
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 300 <= w <= 3000 and 300 <= h <= 2000, (w, h)
    # nothing else (no ".name.part.png" leftovers) in the folder
    assert all(not p.name.startswith(".") for p in folder.iterdir())


def test_training_curves(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e + 0.02 * e, "val_accuracy": 0.6 + 0.05 * e,
         "val_auroc": None if e == 2 else 0.7 + 0.04 * e, "lr": 1e-3 * 0.5 ** e, "best": e == 3}
        for e in range(1, 6)
    ]
    out = report.plot_training_curves(history, tmp_path / "curves.png", title="run")
    assert out == tmp_path / "curves.png"
    _check_png(tmp_path, "curves.png")
    # a single epoch with only a loss still plots
    report.plot_training_curves([{"epoch": 1, "train_loss": 0.5}], tmp_path / "one.png")
    _check_png(tmp_path, "one.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "one.png"]
    with pytest.raises(DataError):
        report.plot_training_curves([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_confusion_png_and_csv(tmp_path):
    cm = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]
    report.plot_confusion_matrix(cm, NAMES3, tmp_path / "cm.png", title="Test set")
    _check_png(tmp_path, "cm.png")
    report.write_confusion_csv(np.array(cm), NAMES3, tmp_path / "cm.csv")
    text = (tmp_path / "cm.csv").read_text(encoding="utf-8")
    assert text.splitlines() == [
        "true\\pred,NORMAL,BACTERIA,VIRUS",
        "NORMAL,5,1,0",
        "BACTERIA,2,7,1",
        "VIRUS,0,0,0",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.csv", "cm.png"]
    with pytest.raises(DataError):
        report.write_confusion_csv([[1, 2]], NAMES3, tmp_path / "bad.csv")


def test_roc_binary_and_multiclass(tmp_path):
    y, probs = _probs()
    op = {"sensitivity": 0.9, "specificity": 0.7, "threshold": 0.42}
    report.plot_roc(y, probs, NAMES3, tmp_path / "roc3.png", negative_index=0, operating_point=op)
    _check_png(tmp_path, "roc3.png")
    yb = (y > 0).astype(int)
    pb = np.stack([probs[:, 0], 1 - probs[:, 0]], axis=1)
    report.plot_roc(yb, pb, ["NORMAL", "PNEUMONIA"], tmp_path / "roc2.png", operating_point=op)
    _check_png(tmp_path, "roc2.png")
    # one class only: no curve, but still a figure
    report.plot_roc(np.zeros(4, int), pb[:4], ["NORMAL", "PNEUMONIA"], tmp_path / "roc1.png")
    _check_png(tmp_path, "roc1.png")
    assert len(list(tmp_path.iterdir())) == 3


def test_probability_histogram(tmp_path):
    y, probs = _probs()
    report.plot_probability_histogram(
        y, probs, NAMES3, tmp_path / "h_abn.png", negative_index=0, threshold=0.5
    )
    report.plot_probability_histogram(y, probs, NAMES3, tmp_path / "h_ovr.png")
    _check_png(tmp_path, "h_abn.png")
    _check_png(tmp_path, "h_ovr.png")
    assert len(list(tmp_path.iterdir())) == 2
