"""``cxrtool predict``: label images or folders with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._common import CheckpointOpt, JsonOpt, out_console, print_json, progress_bars


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    checkpoint: CheckpointOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write a CSV (path, label, per-class probabilities, threshold).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold on the abnormality score (default: the checkpoint's).")] = None,
    tta: Annotated[int, typer.Option(help="Average the plain view with N augmented views (test-time augmentation).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Predict labels and per-class probabilities (batched; optional test-time augmentation)."""
    import numpy as np

    from cxrtool import checkpoint as C
    from cxrtool import metrics as M
    from cxrtool.data import ImageSet, gather_images
    from cxrtool.infer import predict_set
    from cxrtool.io import write_csv

    ckpt = C.load(checkpoint)
    paths = gather_images(images)
    ds = ImageSet(paths, np.full(len(paths), -1), ckpt.class_names, paths)
    with progress_bars(not quiet and len(paths) > 1) as bars:
        pred = predict_set(ckpt, ds, batch_size=batch_size, tta=tta, strict=strict, progress=bars("predict", len(ds)))
    names, neg = ckpt.class_names, ckpt.negative_index
    thr = threshold if threshold is not None else ckpt.threshold
    decided = M.decide(pred.probs, neg, thr)
    rows = []
    for i, d, p in zip(pred.kept, decided, pred.probs):
        row = {"path": paths[i], "label": names[d], "probability": float(p[d])}
        row.update({f"p_{n}": float(p[k]) for k, n in enumerate(names)})
        row["threshold"] = thr
        rows.append(row)
    if output:
        write_csv(output, rows, ["path", "label", "probability", *[f"p_{n}" for n in names], "threshold"])
    if json_out:
        print_json({"checkpoint": str(ckpt.path), "class_names": names, "threshold": thr, "tta": tta,
                    "predictions": rows, "skipped": [m for _, m in pred.failures]})
        return
    if output:
        out_console.print(f"{len(rows)} predictions written to {output}")
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} image(s) — {ckpt.path}" + (f" — threshold {thr:.3f}" if thr is not None else ""))
    table.add_column("image", overflow="fold")
    table.add_column("label")
    for n in names:
        table.add_column(f"p({n})", justify="right")
    for r in rows:
        table.add_row(r["path"], r["label"], *[f"{r[f'p_{n}']:.3f}" for n in names])
    if thr is not None and neg is not None:
        table.caption = f"abnormal when 1 - p({names[neg]}) >= {thr:.3g}" + _operating_point_note(ckpt, threshold)
    out_console.print(table)


def _operating_point_note(ckpt, given: float | None) -> str:
    """Why the threshold is where it is (a low one means high sensitivity at the cost of specificity)."""
    op = ckpt.meta.get("operating_point") or {}
    if given is not None or not op:
        return " (--threshold)" if given is not None else ""
    target = ", ".join(f"{k} >= {v:g}" for k, v in (op.get("target") or {}).items())
    got = ", ".join(f"{k} {op[k]:.3f}" for k in ("sensitivity", "specificity") if isinstance(op.get(k), (int, float)))
    where = op.get("chosen_on", "training")
    return (f": the operating point stored at training ({target}; on the {where}: {got}); "
            "--threshold to change it") if target else ""


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Models")(predict)
