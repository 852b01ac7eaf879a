"""Data layer: layouts, labels, patient ids, patient-aware splits, decoding cache, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from cxrtool.data import (
    DataWarning,
    check_classes,
    decode_all,
    kermany_patient,
    kermany_subtype,
    load_splits,
    patient_split,
)
from cxrtool.errors import DataError, ImageReadError, UsageError
from cxrtool.imaging import Preprocessing


def _img(path, value=128, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


KERMANY = [
    ("NORMAL", "IM-0115-0001.jpeg"), ("NORMAL", "IM-0115-0002.jpeg"), ("NORMAL", "NORMAL2-IM-1158-0001.jpeg"),
    ("PNEUMONIA", "person1000_bacteria_2931.jpeg"), ("PNEUMONIA", "person1000_virus_1681.jpeg"),
    ("PNEUMONIA", "person12_bacteria_45.jpeg"),
]


@pytest.mark.parametrize("name,patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"), ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1158-0001.jpeg", "NORMAL2-IM-1158"), ("random.png", None),
])
def test_kermany_patient(name, patient):
    assert kermany_patient(name) == patient


def test_kermany_subtype():
    assert kermany_subtype("person1_bacteria_1.jpeg", "PNEUMONIA") == "bacteria"
    assert kermany_subtype("person1_virus_6.jpeg", "PNEUMONIA") == "virus"
    assert kermany_subtype("IM-0001-0001.jpeg", "NORMAL") == "normal"
    assert kermany_subtype("weird.jpeg", "PNEUMONIA") is None


def test_folder_layout_and_subtypes(tmp_path):
    for cls, name in KERMANY:
        _img(tmp_path / cls / name)
    ds = load_splits(tmp_path)["all"]
    assert ds.class_names == ["NORMAL", "PNEUMONIA"] and ds.counts() == {"NORMAL": 3, "PNEUMONIA": 3}
    assert ds.has_patient_ids and ds.patients.count("IM-0115") == 2 and ds.patients.count("person1000") == 2
    sub = load_splits(tmp_path, labels="kermany-subtype")["all"]
    assert sub.class_names == ["normal", "bacteria", "virus"]
    assert sub.counts() == {"normal": 3, "bacteria": 2, "virus": 1}


def test_split_folders(tmp_path):
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            _img(tmp_path / split / cls / f"{split}{cls}.png")
    _img(tmp_path / "test" / "COVID" / "c.png")
    splits = load_splits(tmp_path)
    assert set(splits) == {"train", "test"}
    assert splits["train"].class_names == splits["test"].class_names == ["COVID", "NORMAL", "PNEUMONIA"]


def test_csv_manifest(tmp_path):
    for i in range(4):
        _img(tmp_path / "img" / f"{i}.png")
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id,split,sub\nimg/0.png,a,p1,train,x\nimg/1.png,b,p1,train,y\n"
        "img/2.png,a,p2,test,x\nimg/3.png,b,p3,test,y\n")
    splits = load_splits(tmp_path / "m.csv")
    assert set(splits) == {"train", "test"} and splits["train"].patients == ["p1", "p1"]
    assert splits["test"].paths[0] == str(tmp_path / "img" / "2.png")
    other = load_splits(tmp_path / "m.csv", labels="column:sub")
    assert other["train"].class_names == ["x", "y"]
    with pytest.raises(DataError, match="no 'nope' column"):
        load_splits(tmp_path / "m.csv", labels="column:nope")


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1]] * 5, dtype=np.uint8),
             val_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8), val_labels=np.zeros((4, 1), np.uint8))
    splits = load_splits(tmp_path / "pneumoniamnist.npz")
    assert splits["train"].class_names == ["normal", "pneumonia"] and len(splits["val"]) == 4
    arr, kept = decode_all(splits["train"], Preprocessing(size=32), cache_dir=None)
    assert arr.shape == (10, 32, 32) and arr.dtype == np.uint8


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "no class sub-folders"),
    (lambda p: (p / "A").mkdir(parents=True), "no images found"),
])
def test_missing_or_empty_data(tmp_path, make, match):
    make(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match=match):
            load_splits(tmp_path / "d")


def test_single_class_and_empty_class(tmp_path):
    _img(tmp_path / "A" / "1.png")
    (tmp_path / "B").mkdir()
    with pytest.warns(DataWarning, match="has no images"):
        ds = load_splits(tmp_path)["all"]
    with pytest.raises(DataError, match="only one class"):
        check_classes(ds)


def test_bad_label_mode(tmp_path):
    with pytest.raises(UsageError):
        load_splits(tmp_path, labels="bogus")


def test_patient_split_keeps_patients_together():
    from cxrtool.data import ImageSet

    patients = [f"p{i // 3}" for i in range(300)]
    labels = np.array([(i // 3) % 2 for i in range(300)])
    ds = ImageSet([f"{i}.png" for i in range(300)], labels, ["a", "b"], patients)
    keep, held = patient_split(ds, 0.2, seed=1)
    assert len(keep) + len(held) == 300
    assert not {patients[i] for i in keep} & {patients[i] for i in held}
    assert 0.15 < len(held) / 300 < 0.25
    assert abs(labels[held].mean() - 0.5) < 0.15  # stratified
    keep2, held2 = patient_split(ds, 0.2, seed=1)
    assert np.array_equal(held, held2)


def test_decode_skips_corrupt_files_with_a_named_warning(tmp_path):
    for i in range(3):
        _img(tmp_path / "A" / f"{i}.png", value=50 * i)
        _img(tmp_path / "B" / f"{i}.png")
    (tmp_path / "A" / "empty.png").write_bytes(b"")
    (tmp_path / "B" / "text.png").write_text("not an image")
    ds = load_splits(tmp_path)["all"]
    with pytest.warns(DataWarning) as rec:
        arr, kept = decode_all(ds, Preprocessing(size=16), cache_dir=None)
    text = " ".join(str(w.message) for w in rec)
    assert "empty.png" in text and "text.png" in text
    assert len(kept) == 6 and arr.shape == (6, 16, 16)
    with pytest.raises(ImageReadError, match="empty.png"):
        decode_all(ds, Preprocessing(size=16), cache_dir=None, strict=True)


def test_decode_cache_is_reused_and_invalidated(tmp_path):
    for i in range(2):
        _img(tmp_path / "d" / "A" / f"{i}.png", value=10)
        _img(tmp_path / "d" / "B" / f"{i}.png", value=200)
    ds = load_splits(tmp_path / "d")["all"]
    pp = Preprocessing(size=16)
    a1, _ = decode_all(ds, pp, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    a2, _ = decode_all(ds, pp, cache_dir=tmp_path / "cache")
    assert np.array_equal(a1, a2)
    _img(tmp_path / "d" / "A" / "0.png", value=99, size=(41, 30))  # changed file -> new key
    a3, _ = decode_all(ds, pp, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 and not np.array_equal(a1, a3)
