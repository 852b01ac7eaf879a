"""``cxrtool embed``: extraction (shapes, any layer, determinism, equality with a plain forward pass),
kNN (separable clusters vs shuffled labels, patient-grouped CV), projections (seeded t-SNE, PCA),
similar-case search, and one-line errors that leave no files behind. A tiny random ``compact``
model on 32 px phantoms keeps it fast."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrtool.cli import main
from cxrtool.embed import Embeddings, build_projection, knn_cross_validate, knn_score, nearest, relabel
from cxrtool.errors import DataError, UsageError
from cxrtool.synthetic import write_dataset
from cxrtool.testing import run_cli

run = run_cli  # (exit code, stdout, stderr) of `cxrtool ARGS`


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def tiny_checkpoint(path: Path, size: int = 32, seed: int = 0) -> Path:
    import torch

    from cxrtool import checkpoint as C
    from cxrtool.imaging import Preprocessing
    from cxrtool.models import build_model

    torch.manual_seed(seed)
    model = build_model("compact", 2, {"width": 4})
    meta = {"kind": "classifier", "model": {"name": "compact", "options": {"width": 4}},
            "class_names": ["LESION", "NORMAL"], "negative_class": "NORMAL",
            "preprocessing": Preprocessing(size=size).to_dict(), "embedding_layer": "avgpool"}
    return C.save(path, model.state_dict(), meta)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Phantoms (train/test folders), a tiny checkpoint and one extraction shared by the read-only tests."""
    root = tmp_path_factory.mktemp("embed")
    write_dataset(root / "data" / "train", n_per_class=10, size=40, seed=0)
    write_dataset(root / "data" / "test", n_per_class=5, size=40, seed=1)
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    npz = root / "out" / "emb.npz"
    try:
        main(["embed", "extract", "--data", str(root / "data"), "-c", str(ckpt), "-o", str(npz), "-q", "--batch-size", "8"])
    except SystemExit as exc:
        assert not exc.code
    return {"root": root, "data": root / "data", "ckpt": ckpt, "npz": npz}


def clusters(n_per_class: int, n_classes: int = 3, dim: int = 16, seed: int = 0, spread: float = 0.3,
             images_per_patient: int = 1) -> Embeddings:
    """Gaussian clusters (one per class) around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    vectors = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    paths = [f"img{i}.png" for i in range(len(labels))]
    patients = [f"p{i // images_per_patient}-{labels[i]}" for i in range(len(labels))]
    return Embeddings(vectors.astype(np.float32), paths, labels, [f"c{i}" for i in range(n_classes)], patients,
                      ["all"] * len(labels), layer="x")


# ------------------------------------------------------------------------------------ extraction


def test_extract_writes_npz_and_index(setup):
    emb = Embeddings.load(setup["npz"])
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (30, 64)  # width 4 -> 16 * 4 channels
    assert emb.split_counts() == {"test": 10, "train": 20}
    assert emb.class_names == ["LESION", "NORMAL"] and emb.counts() == {"LESION": 15, "NORMAL": 15}
    assert emb.layer == "avgpool" and emb.model == "compact" and len(emb.checkpoint_sha256) == 64
    with np.load(setup["npz"], allow_pickle=False) as z:  # plain arrays, no pickles
        assert {"embeddings", "paths", "labels", "class_names", "patients", "layer", "checkpoint"} <= set(z.files)
    rows = list(csv.DictReader(open(setup["npz"].with_suffix(".csv"))))
    assert len(rows) == 30 and rows[0].keys() == {"row", "path", "label", "patient_id", "split"}
    assert not list(setup["npz"].parent.glob(".*part*"))


def test_extraction_equals_a_plain_forward_pass_and_is_deterministic(setup, tmp_path, capsys):
    import torch

    from cxrtool import checkpoint as C
    from cxrtool.imaging import load, to_tensor

    emb = Embeddings.load(setup["npz"])
    ckpt = C.load(setup["ckpt"])
    m = ckpt.model
    picks = [0, 7, 25]
    x = to_tensor(np.stack([load(emb.paths[i], ckpt.preprocessing) for i in picks]), ckpt.preprocessing)
    with torch.inference_mode():
        feats = m.avgpool(m.stage5(m.stage4(m.stage3(m.stage2(m.stage1(x)))))).flatten(1).numpy()
    np.testing.assert_allclose(emb.vectors[picks], feats, rtol=1e-4, atol=1e-5)

    code, out, err = run(capsys, "embed", "extract", "--data", setup["data"], "-c", setup["ckpt"], "-o",
                         tmp_path / "again.npz", "-q", "--batch-size", "7", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 30
    again = Embeddings.load(tmp_path / "again.npz")
    assert again.paths == emb.paths
    np.testing.assert_allclose(again.vectors, emb.vectors, rtol=1e-5, atol=1e-6)  # batch size does not matter


def test_any_named_layer_is_pooled_to_a_vector(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "extract", "--data", setup["data"], "-c", setup["ckpt"], "--split", "test",
                         "--layer", "stage3", "-o", tmp_path, "-q", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["dim"] == 16 and result["n"] == 10 and result["splits"] == {"test": 10}
    assert Path(result["embeddings"]) == tmp_path / "embeddings.npz"
    emb = Embeddings.load(tmp_path / "embeddings.npz")
    assert emb.layer == "stage3" and emb.vectors.shape == (10, 16)


def test_images_embedded_on_the_fly_equal_stored_embeddings(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "knn", "--data", setup["data"], "-c", setup["ckpt"], "--k", "3",
                         "-o", tmp_path / "fly", "-q", "--json")
    assert code == 0, err
    code2, out2, err2 = run(capsys, "embed", "knn", "--data", setup["npz"], "--k", "3", "-o", tmp_path / "st", "-q",
                            "--json")
    assert code2 == 0, err2
    fly, stored = json.loads(out), json.loads(out2)
    assert fly["confusion_matrix"] == stored["confusion_matrix"] and fly["n_reference"] == stored["n_reference"] == 20


def test_images_scored_against_stored_embeddings_use_their_checkpoint(setup, tmp_path, capsys):
    # no --checkpoint and no latest run: the query images must be embedded with the .npz's checkpoint
    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "--split", "train", "--query", setup["data"],
                         "--query-split", "test", "--k", "3", "-o", tmp_path / "q", "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["n"] == 10 and r["n_reference"] == 20
    other = tiny_checkpoint(tmp_path / "other.safetensors", seed=1)
    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "-c", other, "-o", tmp_path / "x", "-q")
    assert code == 2 and "another checkpoint" in one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_cascade_checkpoints_embed_from_stage1(setup, tmp_path):
    import torch

    from cxrtool import checkpoint as C
    from cxrtool.data import load_splits
    from cxrtool.embed import extract, resolve_layer
    from cxrtool.imaging import Preprocessing

    meta = {"kind": "classifier", "model": {"name": "compact", "options": {"width": 4}},
            "class_names": ["bacteria", "normal", "virus"], "negative_class": "normal",
            "cascade": {"negative_class": "normal", "stage2_classes": ["bacteria", "virus"]},
            "preprocessing": Preprocessing(size=32).to_dict(), "embedding_layer": "avgpool"}
    torch.manual_seed(0)
    model = C.build_classifier(meta)
    ckpt = C.load(C.save(tmp_path / "cascade.safetensors", model.state_dict(), meta))
    assert resolve_layer(ckpt, None) == "stage1.avgpool" and resolve_layer(ckpt, "stage3") == "stage1.stage3"
    assert resolve_layer(ckpt, "stage2.avgpool") == "stage2.avgpool"
    emb = extract(ckpt, load_splits(setup["data"])["test"], split="test")
    assert emb.vectors.shape == (10, 64) and emb.layer == "stage1.avgpool"


def test_unknown_layer_lists_valid_ones_and_writes_nothing(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "extract", "--data", setup["data"], "-c", setup["ckpt"], "--layer", "nope",
                         "-o", tmp_path / "x" / "e.npz", "-q")
    line = one_line_error(err)
    assert code == 2 and "'nope'" in line and "stage1" in line and "avgpool" in line
    assert not (tmp_path / "x").exists()


def test_stored_embeddings_refuse_another_layer(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "--layer", "stage2", "-o", tmp_path / "k", "-q")
    assert code == 2 and "stage2" in one_line_error(err)
    assert not (tmp_path / "k").exists()


# -------------------------------------------------------------------------------------------- kNN


def test_knn_separates_clusters_and_shuffled_labels_score_chance():
    ref, query = clusters(100, seed=0), clusters(100, seed=0)
    query.vectors = query.vectors + 0.3 * np.random.default_rng(1).standard_normal(query.vectors.shape).astype(np.float32)
    query.patients = [f"q{p}" for p in query.patients]
    for metric in ("cosine", "euclidean"):
        result = knn_score(ref, query, k=7, metric=metric)
        assert result["accuracy"] > 0.97, metric
        assert all(pc["recall"] > 0.95 for pc in result["per_class"].values())
        assert np.asarray(result["confusion_matrix"]).sum() == 300
    shuffled = Embeddings(ref.vectors, ref.paths, np.random.default_rng(2).permutation(ref.labels), ref.class_names,
                          ref.patients, ref.splits, layer="x")
    control = knn_score(shuffled, query, k=7)
    assert abs(control["accuracy"] - 1 / 3) < 0.12, control["accuracy"]


def test_cross_validation_is_grouped_by_patient():
    # patients of 4 near-identical images with a label drawn per patient and no class structure:
    # image-level folds would score ~1.0 from a patient's own twins; patient folds must score ~chance
    rng = np.random.default_rng(0)
    n_pat, per = 60, 4
    centres = rng.standard_normal((n_pat, 8))
    pat_label = rng.integers(0, 2, n_pat)
    idx = np.repeat(np.arange(n_pat), per)
    vectors = (centres[idx] + 0.01 * rng.standard_normal((len(idx), 8))).astype(np.float32)
    emb = Embeddings(vectors, [f"i{i}" for i in range(len(idx))], pat_label[idx], ["a", "b"],
                     [f"p{p}" for p in idx], ["all"] * len(idx), layer="x")
    grouped = knn_cross_validate(emb, k=1, folds=5)
    assert grouped["grouped_by"] == "patient" and len(grouped["fold_accuracy"]) == 5
    assert grouped["accuracy"] < 0.75, grouped["accuracy"]
    ungrouped = Embeddings(vectors, emb.paths, emb.labels, ["a", "b"], [f"img:{i}" for i in range(len(idx))],
                           emb.splits, layer="x")
    assert knn_cross_validate(ungrouped, k=1, folds=5)["accuracy"] > 0.95  # the leak grouping prevents
    good = knn_cross_validate(clusters(40, images_per_patient=2), k=5, folds=4)
    assert good["accuracy"] > 0.95


def test_knn_errors():
    ref = clusters(5)
    with pytest.raises(UsageError, match="larger than the reference set"):
        knn_score(ref, ref, k=16)
    with pytest.raises(UsageError, match="metric"):
        knn_score(ref, ref, k=3, metric="manhattan")
    with pytest.raises(DataError, match="empty"):
        knn_score(ref.subset([]), ref, k=3)
    with pytest.raises(DataError, match="patients"):
        knn_cross_validate(clusters(1), k=1, folds=5)


def test_knn_cli_fit_score_and_cross_validation(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "--k", "3", "--metric", "euclidean",
                         "-o", tmp_path / "fs", "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["mode"] == "fit/score" and r["fit_split"] == "train" and r["query_split"] == "test"
    assert r["n_reference"] == 20 and r["n"] == 10 and 0 <= r["accuracy"] <= 1 and set(r["per_class"]) == {"LESION", "NORMAL"}
    for name in ("metrics.json", "predictions.csv", "confusion.csv", "confusion.png"):
        assert (tmp_path / "fs" / name).stat().st_size > 0
    assert len((tmp_path / "fs" / "predictions.csv").read_text().splitlines()) == 11

    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "--split", "train", "--folds", "3", "-k", "3",
                         "-o", tmp_path / "cv", "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["mode"] == "cross-validation" and r["folds"] == 3 and r["n"] == 20


def test_knn_k_larger_than_reference_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "--k", "21", "-o", tmp_path / "k", "-q")
    assert code == 2 and "larger than the reference set (20 images)" in one_line_error(err)
    assert not (tmp_path / "k").exists()


def test_relabel_kermany_subtypes_from_stored_paths():
    paths = ["x/NORMAL/IM-0001-0001.jpeg", "x/PNEUMONIA/person1_bacteria_1.jpeg", "x/PNEUMONIA/person2_virus_3.jpeg"]
    emb = Embeddings(np.eye(3, dtype=np.float32), paths, [0, 1, 1], ["NORMAL", "PNEUMONIA"], ["a", "b", "c"],
                     ["all"] * 3, layer="x")
    sub = relabel(emb, "kermany-subtype")
    assert sub.class_names == ["normal", "bacteria", "virus"] and sub.labels.tolist() == [0, 1, 2]
    with pytest.raises(UsageError):
        relabel(emb, "column:other")


# ------------------------------------------------------------------------------------ projections


def test_tsne_and_pca_are_seeded_and_deterministic():
    x = clusters(15, seed=3).vectors
    tsne = build_projection("tsne", {"perplexity": "5", "max_iter": "250"})  # strings, as from the CLI
    assert tsne.options["perplexity"] == 5.0 and tsne.options["max_iter"] == 250
    a, b = tsne.fit_transform(x, seed=1), tsne.fit_transform(x, seed=1)
    assert a.shape == (45, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    rand = build_projection("tsne", {"perplexity": 5.0, "max_iter": 250, "init": "random"})
    c = rand.fit_transform(x, seed=1)
    np.testing.assert_array_equal(c, rand.fit_transform(x, seed=1))
    assert not np.allclose(c, rand.fit_transform(x, seed=2))  # the seed is used
    pca = build_projection("pca")
    np.testing.assert_array_equal(pca.fit_transform(x), pca.fit_transform(x))
    with pytest.raises(UsageError, match="no option"):
        build_projection("pca", {"perplexity": 3})
    with pytest.raises(UsageError, match="unknown projection"):
        build_projection("nope")


def test_project_cli_writes_coordinates_and_both_scatters(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "project", "--data", setup["npz"], "--method", "pca", "-o", tmp_path / "p",
                         "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["n"] == 30 and r["sets"] == {"test": 10, "train": 20}
    rows = list(csv.DictReader(open(tmp_path / "p" / "coordinates.csv")))
    assert len(rows) == 30 and {"path", "label", "split", "x", "y"} <= rows[0].keys()
    for name in ("by-class.png", "by-split.png", "projection.json"):
        assert (tmp_path / "p" / name).stat().st_size > 0

    code, out, err = run(capsys, "embed", "project", "--data", setup["npz"], "--split", "train", "--perplexity", "5",
                         "--option", "max_iter=250", "--seed", "3", "-o", tmp_path / "t", "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["method"] == "tsne" and r["options"]["perplexity"] == 5.0 and r["n"] == 20
    assert not (tmp_path / "t" / "by-split.png").exists()  # one set: one scatter


def test_perplexity_too_large_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    code, out, err = run(capsys, "embed", "project", "--data", setup["npz"], "--split", "test", "--perplexity", "10",
                         "-o", tmp_path / "p", "-q")
    assert code == 2 and "number of points (10)" in one_line_error(err)
    assert not (tmp_path / "p").exists()


def test_projections_inventory(capsys):
    code, out, err = run(capsys, "embed", "projections", "--json")
    assert code == 0, err
    listed = {p["name"]: p for p in json.loads(out)}
    assert {"tsne", "pca"} <= set(listed) and "perplexity" in listed["tsne"]["options"]
    code, out, err = run(capsys, "embed", "projections")
    assert code == 0 and "tsne" in out


def test_projection_plugin_import_is_light():
    code = ("import sys, cxrtool_builtin.projections as p; p.specs(); "
            "assert not {'torch', 'sklearn'} & set(sys.modules), sorted(m for m in sys.modules if m in ('torch', 'sklearn'))")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------- similar cases


def test_nearest_excludes_and_orders():
    emb = clusters(10, seed=4)
    idx, dist = nearest(emb, emb.vectors[3], k=4, metric="euclidean")
    assert idx[0] == 3 and dist[0] == pytest.approx(0, abs=1e-6) and np.all(np.diff(dist) >= 0)
    exclude = np.zeros(len(emb), bool)
    exclude[3] = True
    idx, _ = nearest(emb, emb.vectors[3], k=4, exclude=exclude)
    assert 3 not in idx and all(emb.labels[i] == emb.labels[3] for i in idx)
    with pytest.raises(UsageError, match="larger than the embedded set"):
        nearest(emb, emb.vectors[0], k=30, exclude=exclude)


def test_similar_cli_finds_a_copy_of_a_set_image(setup, tmp_path, capsys):
    import shutil

    emb = Embeddings.load(setup["npz"])
    source = emb.paths[12]
    query = tmp_path / "query.png"
    shutil.copy(source, query)
    code, out, err = run(capsys, "embed", "similar", query, "--data", setup["npz"], "-k", "4", "-o", tmp_path / "s",
                         "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    first = r["neighbours"][0]
    assert Path(first["path"]) == Path(source) and first["distance"] < 1e-5 and len(r["neighbours"]) == 4
    assert [n["rank"] for n in r["neighbours"]] == [1, 2, 3, 4]
    rows = list(csv.DictReader(open(tmp_path / "s" / "similar.csv")))
    assert len(rows) == 4 and rows[0]["path"] == source
    assert (tmp_path / "s" / "similar.png").stat().st_size > 0

    # a query that is in the set is not its own neighbour
    code, out, err = run(capsys, "embed", "similar", source, "--data", setup["npz"], "-k", "3", "-o", tmp_path / "s2",
                         "-q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert source not in [n["path"] for n in r["neighbours"]] and r["query_label"] == emb.class_names[emb.labels[12]]


def test_unreadable_query_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    code, out, err = run(capsys, "embed", "similar", bad, "--data", setup["npz"], "-o", tmp_path / "s", "-q")
    assert code == 1 and "broken.png" in one_line_error(err)
    assert not (tmp_path / "s").exists()


def test_empty_sets_are_one_line_errors(setup, tmp_path, capsys):
    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    (tmp_path / "empty" / "LESION").mkdir(parents=True)
    code, out, err = run(capsys, "embed", "extract", "--data", tmp_path / "empty", "-c", setup["ckpt"], "-o",
                         tmp_path / "o", "-q")
    assert code == 1 and "no images" in one_line_error(err)
    empty = Embeddings.load(setup["npz"]).subset([])
    empty.save(tmp_path / "none.npz")
    code, out, err = run(capsys, "embed", "project", "--data", tmp_path / "none.npz", "--method", "pca", "-o",
                         tmp_path / "p", "-q")
    assert code == 1 and "empty" in one_line_error(err)
    code, out, err = run(capsys, "embed", "knn", "--data", setup["npz"], "--split", "val", "-o", tmp_path / "k", "-q")
    assert code == 2 and "'val'" in one_line_error(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists() and not (tmp_path / "k").exists()


# -------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_embed_real_kermany_images(shared_data, tmp_path, capsys):
    """A few real Kermany images through a tiny random model: shapes, finiteness, CSV index, similar."""
    root = shared_data / "kermany224" / "train"
    picks = sorted((root / "NORMAL").glob("*.jpeg"))[:4] + sorted((root / "PNEUMONIA").glob("*.jpeg"))[:4]
    manifest = tmp_path / "few.csv"
    with open(manifest, "w") as fh:
        fh.write("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in picks))
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", size=64)
    code, out, err = run(capsys, "embed", "extract", "--data", manifest, "-c", ckpt, "-o", tmp_path / "e.npz", "-q",
                         "--labels", "kermany-subtype", "--json")
    assert code == 0, err
    emb = Embeddings.load(tmp_path / "e.npz")
    assert emb.vectors.shape == (8, 64) and np.isfinite(emb.vectors).all() and emb.vectors.std() > 0
    assert "normal" in emb.class_names and any(p.startswith("person") for p in emb.patients)  # Kermany patient ids
    code, out, err = run(capsys, "embed", "similar", picks[0], "--data", tmp_path / "e.npz", "-k", "3", "-o",
                         tmp_path / "s", "-q", "--json")
    assert code == 0, err
    assert len(json.loads(out)["neighbours"]) == 3 and (tmp_path / "s" / "similar.png").is_file()
