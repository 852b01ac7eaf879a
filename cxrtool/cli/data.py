"""``cxrtool data``: inspect, split and fetch datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._common import JsonOpt, out_console, print_json

data_app = typer.Typer(help="Inspect, split (patient-aware) and fetch datasets.", no_args_is_help=True)


@data_app.command("info")
def info(
    data: Annotated[Path, typer.Argument(help="Folder per class, CSV manifest or .npz.")],
    labels: Annotated[str, typer.Option(help="folder | kermany-subtype | column:NAME.")] = "folder",
    json_out: JsonOpt = False,
) -> None:
    """Images per split and class, and how many patients."""
    from cxrtool.data import load_splits

    splits = load_splits(data, labels=labels)
    result = {
        name: {"images": len(ds), "patients": len(set(ds.patients)) if ds.has_patient_ids else None,
               "classes": ds.counts()}
        for name, ds in splits.items()
    }
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    names = sorted({c for r in result.values() for c in r["classes"]})
    table = Table(title=str(data))
    table.add_column("split")
    for col in ("images", "patients", *names):
        table.add_column(col, justify="right")
    for split, r in result.items():
        table.add_row(split, str(r["images"]), str(r["patients"] or "-"), *[str(r["classes"].get(n, 0)) for n in names])
    out_console.print(table)


@data_app.command("split")
def split(
    data: Annotated[Path, typer.Argument(help="Folder per class, or CSV manifest.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV manifest to write (path,label,patient_id,split).")],
    test_fraction: Annotated[float, typer.Option(help="Fraction of patients held out as 'test'.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Fraction of the remaining patients as 'val' (0: none, training splits later).")] = 0.0,
    labels: Annotated[str, typer.Option(help="folder | kermany-subtype | column:NAME.")] = "folder",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Hold out patients (stratified by class, no patient on two sides) and write a CSV manifest."""
    from cxrtool.data import check_classes, load_splits, patient_split, write_split_csv
    from cxrtool.errors import DataError

    splits = load_splits(data, labels=labels)
    if set(splits) != {"all"}:
        raise DataError(f"{data} is already split ({', '.join(splits)}); point at one split or an unsplit manifest")
    ds = splits["all"]
    check_classes(ds, str(data))
    keep, test = patient_split(ds, test_fraction, seed)
    parts = {"train": ds.subset(keep), "test": ds.subset(test)}
    if val_fraction > 0:
        k2, v2 = patient_split(parts["train"], val_fraction, seed)
        parts = {"train": parts["train"].subset(k2), "val": parts["train"].subset(v2), "test": parts["test"]}
    write_split_csv(out, parts)
    result = {name: {"images": len(p), "patients": len(set(p.patients)), "classes": p.counts()} for name, p in parts.items()}
    overlap = set(parts["train"].patients) & set(parts["test"].patients)
    result["patients_in_two_splits"] = len(overlap)
    if json_out:
        print_json({"manifest": str(out), **result})
        return
    for name, r in result.items():
        if isinstance(r, dict):
            out_console.print(f"{name:>5}: {r['images']} images, {r['patients']} patients, {r['classes']}")
    out_console.print(f"wrote {out} (labels as {labels!r}; use --data {out} and --split test)")


@data_app.command("fetch")
def fetch_cmd(
    name: Annotated[Optional[str], typer.Argument(help="Dataset name; omit to list them.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder (default: ~/.cache/cxrtool/data or $CXRTOOL_DATA_DIR).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a public dataset archive (MedMNIST) with MD5 verification into a cache."""
    from cxrtool.fetch import DATASETS, fetch

    if name is None:
        if json_out:
            print_json([{"name": k, "url": u, "md5": m, "description": d} for k, (u, m, d) in DATASETS.items()])
        else:
            for k, (_, _, d) in DATASETS.items():
                out_console.print(f"[bold]{k}[/]: {d}")
        return
    from cxrtool.cli._common import progress_bars

    with progress_bars(not json_out) as bars:
        state: dict = {}

        def progress(n: int, total: int | None) -> None:
            if "advance" not in state:
                state["advance"] = bars(f"fetch {name}", total or 0)
            state["advance"](n)

        path = fetch(name, out, progress)
    if json_out:
        print_json({"name": name, "path": str(path)})
    else:
        out_console.print(f"{name}: {path} (checksum verified); train with --data {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data", rich_help_panel="Data")
