"""``cxrtool train``: train a classifier (or a two-stage cascade) into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._common import JsonOpt, err_console, fmt, print_json, progress_bars

RUN = "Run"
DATA = "Data"
OPT = "Optimisation"
MODEL = "Model"


def train(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Folder per class (optionally train/ val/ test/), CSV manifest or .npz.", rich_help_panel=DATA)] = None,
    val_data: Annotated[Optional[Path], typer.Option(help="Validation data (default: a patient-aware split of --data, or its val/ split).", rich_help_panel=DATA)] = None,
    labels: Annotated[str, typer.Option(help="folder | kermany-subtype (normal/bacteria/virus from Kermany file names) | column:NAME (CSV).", rich_help_panel=DATA)] = "folder",
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients held out for validation when none is given.", rich_help_panel=DATA)] = 0.15,
    size: Annotated[int, typer.Option(help="Input size in pixels (square).", rich_help_panel=DATA)] = 128,
    resize: Annotated[str, typer.Option(help="letterbox (keep aspect, pad) | crop (keep aspect, centre crop) | stretch.", rich_help_panel=DATA)] = "letterbox",
    equalize: Annotated[str, typer.Option(help="none | hist | clahe.", rich_help_panel=DATA)] = "none",
    balance: Annotated[str, typer.Option(help="Class imbalance: none | weights | oversample | undersample.", rich_help_panel=DATA)] = "weights",
    augment: Annotated[str, typer.Option(help="Comma list of augmentations with options, e.g. 'rotate:degrees=5,translate'; 'default' or 'none'. See `cxrtool augmentations`.", rich_help_panel=DATA)] = "default",
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it with a warning.", rich_help_panel=DATA)] = False,
    model: Annotated[str, typer.Option("--model", "-m", help="Architecture; see `cxrtool models`.", rich_help_panel=MODEL)] = "compact",
    model_option: Annotated[Optional[list[str]], typer.Option("--model-option", help="KEY=VALUE model option (repeatable).", rich_help_panel=MODEL)] = None,
    cascade: Annotated[bool, typer.Option(help="Two-stage cascade: normal vs abnormal, then among the abnormal classes.", rich_help_panel=MODEL)] = False,
    pretrained: Annotated[Optional[str], typer.Option(help="'imagenet' (torchvision weights, needs the network once) or a local weights file.", rich_help_panel=MODEL)] = None,
    freeze: Annotated[int, typer.Option(help="Train only the head and the last N blocks (-1: train everything).", rich_help_panel=MODEL)] = -1,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.", rich_help_panel=OPT)] = 15,
    batch_size: Annotated[int, typer.Option(help="Batch size.", rich_help_panel=OPT)] = 64,
    optimizer: Annotated[str, typer.Option(help="adamw | adam | sgd (momentum, Nesterov).", rich_help_panel=OPT)] = "adamw",
    lr: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=OPT)] = 2e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=OPT)] = 1e-4,
    momentum: Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=OPT)] = 0.9,
    schedule: Annotated[str, typer.Option(help="cosine (with warmup) | plateau | step | inverse-time | constant.", rich_help_panel=OPT)] = "cosine",
    warmup_epochs: Annotated[float, typer.Option(help="Linear warmup for the cosine schedule.", rich_help_panel=OPT)] = 1.0,
    step_size: Annotated[int, typer.Option(help="Epochs per step for the step schedule.", rich_help_panel=OPT)] = 5,
    gamma: Annotated[float, typer.Option(help="Decay factor for step / plateau.", rich_help_panel=OPT)] = 0.1,
    decay_rate: Annotated[float, typer.Option(help="Inverse-time decay: lr / (1 + rate * epoch).", rich_help_panel=OPT)] = 0.5,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.", rich_help_panel=OPT)] = 0.0,
    monitor: Annotated[str, typer.Option(help="Validation metric for best checkpoint / early stopping: val_auroc | val_accuracy | val_balanced_accuracy | val_loss.", rich_help_panel=OPT)] = "val_auroc",
    patience: Annotated[int, typer.Option(help="Stop after N epochs without improvement (0: never).", rich_help_panel=OPT)] = 6,
    negative_class: Annotated[Optional[str], typer.Option(help="The 'normal' class for operating points (default: a class named normal).", rich_help_panel=OPT)] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Choose the decision threshold on validation data for this sensitivity.", rich_help_panel=OPT)] = None,
    target_specificity: Annotated[Optional[float], typer.Option(help="... or for this specificity.", rich_help_panel=OPT)] = None,
    seed: Annotated[int, typer.Option(help="Random seed (a CPU run with the same seed repeats exactly).", rich_help_panel=RUN)] = 0,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).", rich_help_panel=RUN)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<time>-<model>).", rich_help_panel=RUN)] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name under runs/.", rich_help_panel=RUN)] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML or JSON file of settings; command-line options override it.", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run folder.", rich_help_panel=RUN)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.", rich_help_panel=RUN)] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a classifier on chest X-rays; writes checkpoints, metrics and curves to a run folder."""
    import json

    from cxrtool.errors import UsageError
    from cxrtool.train import TrainConfig, Trainer, load_config_file

    fields = set(TrainConfig.__dataclass_fields__)
    if resume is not None:  # the run's own config; only a few settings may change when resuming
        cfg_path = Path(resume) / "config.json"
        if not cfg_path.is_file():
            raise UsageError(f"--resume {resume}: not a run folder (no config.json)")
        base, changeable = json.loads(cfg_path.read_text()), {"epochs", "patience", "threads"}
    else:
        base, changeable = (load_config_file(config) if config else {}), fields
    # precedence: options typed on the command line > the config file > the defaults
    typed = {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    settings = {k: v for k, v in ctx.params.items() if k in fields}
    settings.update(base)
    settings.update({k: ctx.params[k] for k in typed & changeable})
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    if model_option:
        opts = dict(settings.get("model_options") or {})
        for item in model_option:
            k, eq, v = item.partition("=")
            if not eq:
                raise UsageError(f"--model-option expects KEY=VALUE, got {item!r}")
            opts[k] = _parse_value(v)
        settings["model_options"] = opts
    if not settings.get("data"):
        raise UsageError("--data is required (a folder per class, a CSV manifest or a .npz)")
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})

    def on_epoch(row: dict) -> None:
        if quiet:
            return
        star = " *" if row["best"] else ""
        err_console.print(
            f"epoch {row['epoch']:>3}  loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"acc {fmt(row['val_accuracy'])}  auroc {fmt(row['val_auroc'])}  "
            f"{fmt(row['train_images_per_s'], 0)} img/s{star}"
        )

    with progress_bars(not quiet) as bars:
        summary = Trainer(cfg, on_epoch=on_epoch, progress=bars).run(resume_dir=Path(resume) if resume else None)
    if json_out:
        print_json(summary)
        return
    _render(summary)


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _render(summary: dict) -> None:
    from rich.table import Table

    from cxrtool.cli._common import out_console

    m = summary["val_metrics"]
    table = Table(title=f"validation ({summary['n_val']} images, best epoch {summary['best_epoch']})")
    table.add_column("class")
    for col in ("precision", "recall", "specificity", "f1", "auroc", "n"):
        table.add_column(col, justify="right")
    for cls, pc in m["per_class"].items():
        table.add_row(cls, fmt(pc["precision"]), fmt(pc["recall"]), fmt(pc["specificity"]), fmt(pc["f1"]),
                      fmt(pc["auroc"]), str(pc["support"]))
    out_console.print(table)
    out_console.print(f"accuracy {fmt(m['accuracy'])}  balanced {fmt(m['balanced_accuracy'])}  AUROC {fmt(m['auroc'])}")
    op = summary.get("operating_point")
    if op:
        out_console.print(
            f"operating point: threshold {op['threshold']:.4f} (sensitivity {op['sensitivity']:.3f}, "
            f"specificity {op['specificity']:.3f} on validation)"
        )
    out_console.print(f"split: {summary['split']}")
    out_console.print(
        f"trained {summary['epochs_run']} epochs in {summary['train_seconds']:.0f} s "
        f"({fmt(summary['train_images_per_s'], 0)} img/s); best checkpoint: {summary['best_checkpoint']}"
    )


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Models")(train)
