"""The command line end to end on tiny phantoms: train -> evaluate -> threshold -> predict -> info,
resume, config files, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from cxrtool.cli import main
from cxrtool.synthetic import write_dataset
from cxrtool.testing import run_cli

FAST = ["--size", "32", "--epochs", "2", "--batch-size", "16", "--quiet", "--threads", "1"]


run = run_cli  # (exit code, stdout, stderr) of `cxrtool ARGS`


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root / "train", n_per_class=24, size=32, seed=0)
    write_dataset(root / "test", n_per_class=8, size=32, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    """One small run shared by the read-only tests."""
    import os

    runs = tmp_path_factory.mktemp("runs")
    old = os.environ.get("CXRTOOL_RUNS_DIR")
    os.environ["CXRTOOL_RUNS_DIR"] = str(runs)
    try:
        main(["train", "--data", str(phantoms), *FAST, "--name", "shared", "--target-sensitivity", "0.9"])
    except SystemExit as exc:
        assert not exc.code
    finally:
        if old is not None:
            os.environ["CXRTOOL_RUNS_DIR"] = old
    return runs / "shared"


def test_train_writes_a_complete_run_folder(trained):
    for name in ("best.safetensors", "last.safetensors", "train_state.pt", "metrics.csv", "curves.png",
                 "split.csv", "config.json", "versions.json", "summary.json"):
        assert (trained / name).is_file(), name
    assert not list(trained.glob(".*part*")), "temporary files left behind"
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["class_names"] == ["LESION", "NORMAL"] and summary["epochs_run"] == 2
    assert summary["operating_point"]["target"] == {"sensitivity": 0.9}
    assert "patient-aware" in summary["split"]
    split = (trained / "split.csv").read_text().splitlines()
    train_pat = {r.split(",")[2] for r in split[1:] if r.endswith(",train")}
    val_pat = {r.split(",")[2] for r in split[1:] if r.endswith(",val")}
    assert train_pat and val_pat and not train_pat & val_pat


def test_evaluate_json_and_outputs(trained, phantoms, capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--data", phantoms, "--checkpoint", trained, "--split", "test",
                         "--json", "--quiet", "--out", tmp_path / "ev")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 16 and result["split"] == "test"
    assert sum(map(sum, result["confusion_matrix"])) == 16
    assert result["threshold"] is not None  # the stored operating point is used
    for f in ("metrics.json", "predictions.csv", "confusion.csv", "confusion.png", "roc.png"):
        assert (tmp_path / "ev" / f).stat().st_size > 0


def test_predict_csv_json_and_tta(trained, phantoms, capsys, tmp_path):
    images = phantoms / "test" / "LESION"
    code, out, err = run(capsys, "predict", images, "--checkpoint", trained, "--json", "--quiet")
    assert code == 0, err
    preds = json.loads(out)["predictions"]
    assert len(preds) == 8 and all(abs(p["p_LESION"] + p["p_NORMAL"] - 1) < 1e-5 for p in preds)
    code, out, err = run(capsys, "predict", images, "-c", trained, "--output", tmp_path / "p.csv", "--tta", "2", "-q")
    assert code == 0, err
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "path,label,probability,p_LESION,p_NORMAL,threshold" and len(lines) == 9
    code, out, err = run(capsys, "predict", images, "-c", trained, "-q", "--threshold", "0.25")
    assert code == 0, err  # the table says how a label follows from the probabilities
    assert "abnormal when 1 - p(NORMAL) >= 0.25 (--threshold)" in " ".join(out.split())


def test_latest_run_is_the_default_checkpoint(trained, phantoms, capsys, monkeypatch):
    monkeypatch.setenv("CXRTOOL_RUNS_DIR", str(trained.parent))
    code, out, err = run(capsys, "predict", phantoms / "test" / "NORMAL", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(trained / "best.safetensors")


def test_threshold_command_stores_operating_point(trained, phantoms, capsys, tmp_path):
    import shutil

    ckpt = tmp_path / "copy.safetensors"
    shutil.copy(trained / "best.safetensors", ckpt)
    code, out, err = run(capsys, "threshold", "--data", phantoms, "--split", "test", "-c", ckpt,
                         "--target-specificity", "0.75", "--json", "-q")
    assert code == 0, err
    op = json.loads(out)
    assert op["specificity"] >= 0.75 and op["stored"]
    code, out, err = run(capsys, "info", ckpt, "--json")
    assert json.loads(out)["operating_point"]["threshold"] == op["threshold"]


def test_same_seed_same_metrics_and_resume(phantoms, capsys, tmp_path):
    a = run(capsys, "train", "--data", phantoms, *FAST, "--out", tmp_path / "a", "--json")
    b = run(capsys, "train", "--data", phantoms, *FAST, "--out", tmp_path / "b", "--json")
    assert a[0] == b[0] == 0, a[2] + b[2]
    ma, mb = json.loads(a[1])["val_metrics"], json.loads(b[1])["val_metrics"]
    assert ma == mb
    # an "interrupted" 1-epoch run resumed to 2 epochs ends where the uninterrupted run ended
    c = run(capsys, "train", "--data", phantoms, *FAST, "--epochs", "1", "--out", tmp_path / "c", "--json")
    assert c[0] == 0, c[2]
    d = run(capsys, "train", "--resume", tmp_path / "c", "--epochs", "2", "--quiet", "--json")
    assert d[0] == 0, d[2]
    hist_a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    hist_d = (tmp_path / "c" / "metrics.csv").read_text().splitlines()
    assert len(hist_d) == 3
    strip = lambda rows: [",".join(r.split(",")[:7]) for r in rows]  # noqa: E731  (drop timing columns)
    assert strip(hist_a) == strip(hist_d)


def test_config_file_with_override(phantoms, capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{phantoms}"\nsize = 32\nepochs = 1\nbatch-size = 16\noptimizer = "sgd"\nlr = 0.01\n')
    code, out, err = run(capsys, "train", "--config", cfg, "--optimizer", "adam", "--out", tmp_path / "r", "-q", "--json")
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["optimizer"] == "adam" and saved["lr"] == 0.01 and saved["epochs"] == 1


def test_cascade_three_classes(tmp_path, capsys):
    write_dataset(tmp_path / "d", n_per_class=16, size=32, seed=0, classes=("NORMAL", "BACTERIA", "VIRUS"))
    code, out, err = run(capsys, "train", "--data", tmp_path / "d", "--cascade", *FAST, "--out", tmp_path / "r", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["class_names"] == ["BACTERIA", "NORMAL", "VIRUS"]
    code, out, err = run(capsys, "predict", tmp_path / "d" / "VIRUS", "-c", tmp_path / "r", "--json", "-q")
    probs = json.loads(out)["predictions"][0]
    assert abs(probs["p_BACTERIA"] + probs["p_NORMAL"] + probs["p_VIRUS"] - 1) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["train", "--data", "/no/such/dir"], "no such file or folder"),
    (["train", "--data", "{phantoms}", "--model", "nonet"], "unknown model 'nonet'; valid models: "),
    (["train", "--data", "{phantoms}", "--augment", "rotate,wobble"], "unknown augmentation 'wobble'"),
    (["train", "--data", "{phantoms}", "--optimizer", "lbfgs"], "--optimizer must be one of"),
    (["predict", "{phantoms}/test", "-c", "{bad}"], "corrupt or not a safetensors file"),
    (["predict", "{phantoms}/test", "-c", "/no/ckpt.safetensors"], "no such file"),
    (["evaluate", "--data", "{phantoms}", "--split", "nope"], "not in the data"),
    (["threshold", "--data", "{phantoms}", "--target-sensitivity", "0.9", "--target-specificity", "0.9"], "exactly one"),
])
def test_bad_input_gives_one_line_error(args, message, phantoms, capsys, tmp_path, trained, monkeypatch):
    monkeypatch.setenv("CXRTOOL_RUNS_DIR", str(trained.parent))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    args = [a.format(phantoms=phantoms, bad=bad) for a in args]
    code, out, err = run(capsys, *args, *(["-q"] if args[0] != "threshold" else []))
    assert code in (1, 2)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.part*"))


def test_single_class_and_nan_loss(tmp_path, capsys):
    write_dataset(tmp_path / "d", n_per_class=8, size=32, seed=0)
    import shutil

    shutil.rmtree(tmp_path / "d" / "LESION")
    code, out, err = run(capsys, "train", "--data", tmp_path / "d", *FAST)
    assert code == 1 and "only one class" in err
    write_dataset(tmp_path / "e", n_per_class=16, size=32, seed=0)
    code, out, err = run(capsys, "train", "--data", tmp_path / "e", *FAST, "--lr", "1e30", "--optimizer", "sgd",
                         "--out", tmp_path / "nan")
    assert code == 1 and "loss became" in err and "Traceback" not in err
