"""``cxrtool anomaly``: placeholder until its issue lands (registers no command yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this command group to the CLI."""
