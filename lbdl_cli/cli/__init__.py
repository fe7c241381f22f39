"""The `lbdl` command line: one Typer app, one module per command group.

Every module in this package that defines `register(app)` is picked up, so a
new command group is a new module and touches no other. Modules import torch
inside their commands, never at import time, so `lbdl --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from .. import __version__
from ..errors import LbdlError, RunFailed


def _version(value: bool):
    if value:
        typer.echo(f"lbdl {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="lbdl",
        help="Train, evaluate, quantize and sample small language models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version and exit."),
    ):
        """Train, evaluate, quantize and sample small language models."""

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 ok, 1 runtime failure, 2 bad input or usage."""
    command = typer.main.get_command(build_app())
    debug = os.environ.get("LBDL_DEBUG", "") not in ("", "0")
    try:
        command.main(args=argv, prog_name="lbdl", standalone_mode=True)
    except LbdlError as e:
        if debug:
            raise
        print(f"lbdl: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        if debug:
            raise
        print(f"lbdl: {e}", file=sys.stderr)
        sys.exit(130 if getattr(e, "exit_code", None) == 130 else 1)
    except KeyboardInterrupt:
        print("lbdl: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or a runtime failure: one line unless debugging
        if debug:
            raise
        message = str(e).splitlines()[0] if str(e) else ""
        print(f"lbdl: failed: {type(e).__name__}: {message} (set LBDL_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
