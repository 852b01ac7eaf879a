"""``cxrtool demo``: the whole job end to end on generated CXR-like phantoms, no download needed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cxrtool.cli._common import err_console, out_console


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the generated data and evaluation outputs.")] = Path("cxrtool-demo"),
    n_per_class: Annotated[int, typer.Option(help="Training phantoms per class.")] = 200,
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 96,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed (data and training).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Generate phantoms with lesions at known places, train, evaluate, predict: a first look in ~1 minute."""
    from cxrtool.cli._common import progress_bars
    from cxrtool.cli.evaluate import evaluate
    from cxrtool.cli.predict import predict
    from cxrtool.cli.train import _render
    from cxrtool.synthetic import write_dataset
    from cxrtool.train import TrainConfig, Trainer

    t0 = time.perf_counter()
    data = out / "data"
    err_console.rule("1/4  generate synthetic chest X-ray phantoms")
    write_dataset(data / "train", n_per_class=n_per_class, size=size, seed=seed)
    write_dataset(data / "test", n_per_class=max(20, n_per_class // 4), size=size, seed=seed + 1)
    err_console.print(f"{data}/train and {data}/test: NORMAL and LESION folders; labels.csv in each holds the "
                      "labels, patient ids and lesion positions")

    err_console.rule("2/4  train (compact CNN, patient-aware validation split)")
    cfg = TrainConfig(data=str(data / "train" / "labels.csv"), model="compact", size=size, epochs=epochs, seed=seed, patience=0,
                      target_sensitivity=0.95, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")

    def on_epoch(row: dict) -> None:
        err_console.print(f"epoch {row['epoch']:>2}  loss {row['train_loss']:.4f}  val acc {row['val_accuracy']:.3f}"
                          f"  val AUROC {row['val_auroc'] or float('nan'):.3f}")

    with progress_bars(not quiet) as bars:
        summary = Trainer(cfg, on_epoch=on_epoch, progress=bars).run()
    _render(summary)
    run = Path(summary["run_dir"])

    err_console.rule("3/4  evaluate on held-out phantoms (data/test)")
    evaluate(data=data / "test" / "labels.csv", checkpoint=run, out=out / "eval", quiet=quiet)

    err_console.rule("4/4  predict a few images")
    samples = sorted((data / "test" / "LESION").glob("*.png"))[:2] + sorted((data / "test" / "NORMAL").glob("*.png"))[:2]
    predict(images=samples, checkpoint=run, quiet=True)

    out_console.print(
        f"\n[bold green]done in {time.perf_counter() - t0:.0f} s.[/] Look at:\n"
        f"  {run}/curves.png          training curves\n"
        f"  {out}/eval/confusion.png  confusion matrix on held-out phantoms\n"
        f"  {out}/eval/roc.png        ROC curve with the operating point\n"
        f"Next: `cxrtool predict {data}/test/LESION` (uses the latest run), `cxrtool info {run}`"
    )


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Start here")(demo)
