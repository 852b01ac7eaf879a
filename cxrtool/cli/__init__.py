"""The ``cxrtool`` command line: one module per command group, plugins may add more.

``main`` turns domain errors into one line on stderr and an exit code (1 runtime, 2 usage).
"""

from __future__ import annotations

import os
import sys

import typer

from cxrtool import __version__
from cxrtool.cli import _common

app = typer.Typer(
    name="cxrtool",
    help="Chest X-ray deep learning with explainability at its heart: train, evaluate, predict, explain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxrtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Chest X-ray deep learning with explainability at its heart."""


_built = False


def _build() -> typer.Typer:
    global _built
    if _built:
        return app
    _built = True
    from cxrtool.cli import anomaly, data, demo, embed, evaluate, explain, inventory, predict, train

    for module in (train, evaluate, predict, explain, embed, anomaly, inventory, demo, data):
        module.register(app)
    from cxrtool.plugins import get_manager

    manager = get_manager()
    for impl in manager.pm.hook.register_commands.get_hookimpls():
        info = manager.info.get(impl.plugin_name)
        try:
            impl.function(app=app)
        except Exception as exc:  # a plugin's command must not brick the CLI
            if info is not None:
                info.errors.append(f"register_commands raised {type(exc).__name__}: {exc}")
            _common.err_console.print(f"[yellow]warning:[/] plugin {impl.plugin_name!r} skipped: {exc}")
    return app


def main(argv: list[str] | None = None) -> None:
    from cxrtool.errors import CxrtoolError

    _common.install_warning_handler()
    try:
        _build()
        app(args=argv, prog_name="cxrtool")
    except CxrtoolError as exc:
        _common.err_console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _common.err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except MemoryError:
        _common.err_console.print("[red]error:[/] out of memory; try a smaller --batch-size or --size")
        sys.exit(1)
    except SystemExit:
        raise
    except Exception:
        if os.environ.get("CXRTOOL_DEBUG") is None:
            _common.err_console.print("[red]internal error[/] (a bug in cxrtool or a plugin); traceback follows:")
        raise
