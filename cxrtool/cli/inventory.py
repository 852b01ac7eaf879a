"""Inventory commands: ``plugins``, ``models``, ``augmentations``, ``info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrtool.cli._common import JsonOpt, out_console, print_json


def plugins(json_out: JsonOpt = False) -> None:
    """List every plugin: version, hooks, what it registers, and any error that made it skip."""
    from cxrtool import registry
    from cxrtool.plugins import get_manager

    registry.collect_all()
    infos = [i.to_dict() for i in sorted(get_manager().info.values(), key=lambda i: i.name)]
    if json_out:
        print_json(infos)
        return
    from rich.table import Table

    table = Table(title="cxrtool plugins")
    for col in ("plugin", "distribution", "version", "registers", "status"):
        table.add_column(col, overflow="fold")
    for i in infos:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in i["registers"].items()) or ", ".join(i["hooks"])
        status = "[green]ok[/]" if i["status"] == "ok" else "[red]" + "; ".join(i["errors"]) + "[/]"
        table.add_row(i["name"], i["distribution"] or i["source"], i["version"] or "-", regs, status)
    out_console.print(table)


def _listing(kind: str, title: str, json_out: bool, columns) -> None:
    from cxrtool import registry

    specs = registry.all_specs(kind)
    if json_out:
        print_json([{**s.to_dict(), "plugin": registry.provider(kind, n)} for n, s in specs.items()])
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("name", style="bold")
    for col, _ in columns:
        table.add_column(col, overflow="fold")
    for name, spec in specs.items():
        table.add_row(name, *[fn(spec) for _, fn in columns])
    out_console.print(table)


def _opts(spec) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"


def models(json_out: JsonOpt = False) -> None:
    """List the model architectures (from all plugins)."""
    _listing("model", "models", json_out, [
        ("description", lambda s: s.description),
        ("size", lambda s: str(s.default_size)),
        ("pretrained", lambda s: "imagenet" if s.pretrained else "-"),
        ("options", _opts),
    ])


def augmentations(json_out: JsonOpt = False) -> None:
    """List the augmentations usable with --augment."""
    _listing("augmentation", "augmentations (--augment NAME[:key=value;...],...)", json_out, [
        ("description", lambda s: s.description),
        ("options", _opts),
    ])


def info(checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or run folder.")] = None,
         json_out: JsonOpt = False) -> None:
    """Show what a checkpoint holds: model, classes, preprocessing, operating point, metrics."""
    from cxrtool import checkpoint as C

    path = C.resolve(checkpoint)
    meta = C.read_meta(path)
    if json_out:
        print_json({"path": str(path), **meta})
        return
    op = meta.get("operating_point") or {}
    op_text = f"threshold {op['threshold']:.4f}, chosen for {op.get('target')}" if op else "none (argmax)"
    lines = [
        f"[bold]{path}[/]  ({meta.get('kind')}, created {meta.get('created')})",
        f"model: {meta['model']['name']} {meta['model'].get('options') or ''}{'  (two-stage cascade)' if meta.get('cascade') else ''}",
        f"classes: {', '.join(meta.get('class_names', []))}  (negative: {meta.get('negative_class')})",
        f"preprocessing: {meta.get('preprocessing')}",
        f"operating point: {op_text}",
        f"epoch: {meta.get('epoch')}   metrics: " + ", ".join(
            f"{k}={v:.4f}" for k, v in (meta.get("metrics") or {}).items() if isinstance(v, float)),
        f"versions: {meta.get('versions')}",
    ]
    for line in lines:
        out_console.print(line, soft_wrap=True)


def register(app: typer.Typer) -> None:
    for fn in (plugins, models, augmentations):
        app.command(rich_help_panel="Inventory")(fn)
    app.command(rich_help_panel="Inventory")(info)
