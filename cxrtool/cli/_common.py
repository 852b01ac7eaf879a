"""Shared CLI plumbing: consoles, one-line errors and warnings, progress bars, JSON output.

Only this package turns :class:`~cxrtool.errors.CxrtoolError` into a message and an exit code.
Heavy libraries (torch, numpy, sklearn) are imported inside command bodies so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Checkpoint file or run folder (default: the latest run's best)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", markup=True, soft_wrap=True)


def install_warning_handler() -> None:
    warnings.showwarning = _show_warning
    warnings.simplefilter("default")
    for noisy in ("torch", "torchvision", "sklearn", "captum", "matplotlib", "skimage"):
        warnings.filterwarnings("ignore", module=noisy)


def print_json(data: Any) -> None:
    from cxrtool.io import to_json

    sys.stdout.write(to_json(data))
    sys.stdout.flush()


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield ``start(description, total) -> advance(n)``; rich bars on stderr, nothing when disabled."""
    if not enabled:
        yield lambda description, total: (lambda n=1: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"))
    with Progress(*columns, console=err_console, transient=False, refresh_per_second=4) as progress:
        current: dict[str, Any] = {}

        def start(description: str, total: int) -> Callable[[int], None]:
            if "task" in current:
                progress.update(current["task"], visible=False)
            task = progress.add_task(description, total=total, extra="")
            current["task"] = task

            def advance(n: int = 1, **fields) -> None:
                progress.update(task, advance=n, **({"extra": fields["extra"]} if "extra" in fields else {}))

            return advance

        yield start


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


OverlayOnOpt = Annotated[str, typer.Option("--overlay-on", help="original: overlays drawn on the original image (the map taken back through the resize) | input: on the model input.")]


def check_overlay_on(value: str) -> None:
    from cxrtool.errors import UsageError
    from cxrtool.imaging import OVERLAY_ON

    if value not in OVERLAY_ON:
        raise UsageError(f"--overlay-on must be {' or '.join(OVERLAY_ON)}, got {value!r}")
