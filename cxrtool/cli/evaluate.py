"""``cxrtool evaluate`` and ``cxrtool threshold``: clinically meaningful metrics and operating points."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._common import CheckpointOpt, JsonOpt, err_console, fmt, out_console, print_json, progress_bars

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Folder per class, CSV manifest or .npz with labels.")]
SplitOpt = Annotated[Optional[str], typer.Option(help="Which split of --data (default: test, else val, else all).")]
LabelsOpt = Annotated[Optional[str], typer.Option(help="How labels are read (default: as in training).")]


def _labelled(ckpt, data: Path, split: str | None, labels: str | None):
    from cxrtool.data import load_splits
    from cxrtool.infer import pick_split

    labels = labels or (ckpt.meta.get("train_config") or {}).get("labels") or "folder"
    if labels.startswith("column:") and data.suffix.lower() != ".csv":
        labels = "kermany-subtype" if "subtype" in labels else "folder"
    name, ds = pick_split(load_splits(data, labels=labels), split)
    ds = ds.with_classes(ckpt.class_names)
    if (ds.labels < 0).any():
        from cxrtool.errors import DataError

        raise DataError(f"{int((ds.labels < 0).sum())} image(s) in {data} have no label")
    return name, ds


def evaluate(
    data: DataOpt,
    checkpoint: CheckpointOpt = None,
    split: SplitOpt = None,
    labels: LabelsOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold on the abnormality score (default: the checkpoint's operating point, else argmax).")] = None,
    tta: Annotated[int, typer.Option(help="Average the plain view with N augmented views.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for metrics.json, predictions.csv, confusion and ROC plots (default: <run>/eval-<data>).")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy, per-class precision/recall/F1, sensitivity/specificity, AUROC, confusion matrix, ROC."""
    from cxrtool import checkpoint as C
    from cxrtool import metrics as M
    from cxrtool import report
    from cxrtool.infer import predict_set
    from cxrtool.io import write_csv, write_json

    ckpt = C.load(checkpoint)
    split_name, ds = _labelled(ckpt, data, split, labels)
    with progress_bars(not quiet) as bars:
        pred = predict_set(ckpt, ds, batch_size=batch_size, tta=tta, strict=strict, progress=bars("evaluate", len(ds)))
    y = ds.labels[pred.kept]
    names, neg = ckpt.class_names, ckpt.negative_index
    thr = threshold if threshold is not None else ckpt.threshold
    result = M.classification_metrics(y, pred.probs, names, negative_index=neg, threshold=thr)
    result.update({
        "checkpoint": str(ckpt.path), "data": str(data), "split": split_name, "threshold": thr,
        "operating_point": ckpt.meta.get("operating_point"), "tta": tta, "skipped": [m for _, m in pred.failures],
    })
    if thr is None and neg is not None:
        result["threshold_note"] = "argmax decision (the checkpoint has no operating point)"
    out = out or ckpt.path.parent / f"eval-{Path(data).stem}-{split_name}"
    out.mkdir(parents=True, exist_ok=True)
    cm = result["confusion_matrix"]
    report.write_confusion_csv(cm, names, out / "confusion.csv")
    report.plot_confusion_matrix(cm, names, out / "confusion.png", title=f"{Path(data).name} ({split_name})")
    op_marker = None
    if thr is not None and neg is not None and result.get("abnormal_vs_normal"):
        av = result["abnormal_vs_normal"]
        op_marker = {"sensitivity": av["sensitivity"], "specificity": av["specificity"], "threshold": thr}
    report.plot_roc(y, pred.probs, names, out / "roc.png", negative_index=neg, operating_point=op_marker)
    decided = M.decide(pred.probs, neg, thr)
    rows = [
        {"path": ds.paths[i], "label": names[yy], "predicted": names[d], **{f"p_{n}": float(p[k]) for k, n in enumerate(names)}}
        for i, yy, d, p in zip(pred.kept, y, decided, pred.probs)
    ]
    write_csv(out / "predictions.csv", rows)
    result["outputs"] = {k: str(out / f) for k, f in (("metrics", "metrics.json"), ("predictions", "predictions.csv"),
                         ("confusion_csv", "confusion.csv"), ("confusion_png", "confusion.png"), ("roc_png", "roc.png"))}
    write_json(out / "metrics.json", result)
    if json_out:
        print_json(result)
        return
    render_metrics(result, title=f"{data} [{split_name}] — {len(y)} images")
    out_console.print(f"outputs in {out}/ (metrics.json, predictions.csv, confusion.png, roc.png)")


def render_metrics(result: dict, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class")
    for col in ("precision", "recall/sens", "specificity", "f1", "auroc", "n"):
        table.add_column(col, justify="right")
    for cls, pc in result["per_class"].items():
        table.add_row(cls, fmt(pc["precision"]), fmt(pc["recall"]), fmt(pc["specificity"]), fmt(pc["f1"]),
                      fmt(pc["auroc"]), str(pc["support"]))
    out_console.print(table)
    out_console.print(
        f"accuracy {fmt(result['accuracy'])}   balanced accuracy {fmt(result['balanced_accuracy'])}   "
        f"AUROC {fmt(result['auroc'])}"
    )
    av = result.get("abnormal_vs_normal")
    if av:
        how = f"threshold {av['threshold']:.4f}" if av.get("threshold") is not None else "argmax"
        out_console.print(
            f"abnormal vs normal ({how}): sensitivity {fmt(av['sensitivity'])}  specificity {fmt(av['specificity'])}  "
            f"PPV {fmt(av.get('ppv'))}  NPV {fmt(av.get('npv'))}"
        )
    cm = result["confusion_matrix"]
    names = list(result["per_class"])
    t = Table(title="confusion matrix (rows: true, columns: predicted)")
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    for n, row in zip(names, cm):
        t.add_row(n, *map(str, row))
    out_console.print(t)


def threshold(
    data: DataOpt,
    checkpoint: CheckpointOpt = None,
    split: SplitOpt = None,
    labels: LabelsOpt = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Pick the highest threshold reaching this sensitivity.")] = None,
    target_specificity: Annotated[Optional[float], typer.Option(help="Pick the lowest threshold reaching this specificity.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Report the threshold without storing it in the checkpoint.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Choose an operating point on validation data and store it in the checkpoint."""
    from cxrtool import checkpoint as C
    from cxrtool import metrics as M
    from cxrtool.errors import UsageError
    from cxrtool.infer import predict_set

    if (target_sensitivity is None) == (target_specificity is None):
        raise UsageError("give exactly one of --target-sensitivity / --target-specificity")
    ckpt = C.load(checkpoint)
    if ckpt.negative_index is None:
        raise UsageError("the checkpoint has no negative (normal) class, so there is no abnormality score to threshold")
    split_name, ds = _labelled(ckpt, data, split, labels)
    with progress_bars(not quiet) as bars:
        pred = predict_set(ckpt, ds, batch_size=batch_size, progress=bars("score", len(ds)))
    y = ds.labels[pred.kept]
    op = M.choose_threshold(y != ckpt.negative_index, M.abnormal_score(pred.probs, ckpt.negative_index),
                            target_sensitivity=target_sensitivity, target_specificity=target_specificity)
    op["chosen_on"] = f"{data} [{split_name}]"
    if not dry_run:
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "created", "versions")}
        meta["operating_point"] = op
        C.save(ckpt.path, ckpt.state, meta)
    if json_out:
        print_json({**op, "checkpoint": str(ckpt.path), "stored": not dry_run})
        return
    out_console.print(
        f"threshold {op['threshold']:.4f}: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f} "
        f"on {op['n_abnormal']} abnormal / {op['n_normal']} normal images"
        + ("" if dry_run else f"; stored in {ckpt.path}")
    )
    if dry_run:
        err_console.print("(dry run: checkpoint unchanged)")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Models")(evaluate)
    app.command(rich_help_panel="Models")(threshold)
