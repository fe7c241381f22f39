"""Rendering shared by the commands: --json, tables, progress bars.

Human output goes to stdout through rich; progress bars draw on stderr and
only on a terminal; with --json the last line of stdout is one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Callable

import typer


class _Lazy:
    """A rich Console made on first use: importing rich costs 60 ms that `--help` and an early error do not pay."""

    def __init__(self, make: Callable):
        self._make, self._console = make, None

    def real(self):
        """The Console itself, for rich objects that take one (Progress)."""
        if self._console is None:
            self._console = self._make()
        return self._console

    def __getattr__(self, name):
        return getattr(self.real(), name)


def _stdout_console():
    """Human output: in a pipe (no terminal, no COLUMNS) lines are not wrapped at 80 columns."""
    import os

    from rich.console import Console

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, soft_wrap=True, width=100_000 if piped else None)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


console = _Lazy(_stdout_console)
err_console = _Lazy(_stderr_console)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object as the last line of output.")
FORCE_OPTION = typer.Option(False, "--force", help="Overwrite the output directory if it exists.")


def emit(result: dict, as_json: bool, render: Callable[[], None]) -> None:
    """Print `result` as JSON (last line of stdout) or render it for a person."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
    else:
        render()


def esc(text) -> str:
    """Text shown inside rich markup, its brackets escaped."""
    from rich.markup import escape

    return escape(str(text))


def note(message: str) -> None:
    """A side remark for a person (stderr, so that stdout stays parseable)."""
    err_console.print(message)


def kv_table(rows: dict, title: str | None = None):
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(str(k), str(v))
    return table


def inline(value) -> str:
    """A section of a config or result as one line for a table cell: "step 392, val_loss 4.571, data shards"."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {inline(v)}" for k, v in value.items() if v is not None and v != {}) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(inline(v) for v in value) if len(value) <= 8 else f"{len(value)} items"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def runs_on(result: dict) -> str:
    """Where a generation or evaluation ran: "cpu, float32", or "llama.cpp, cpu, q8_0" with that engine."""
    engine = result.get("engine", "torch")
    return ("" if engine == "torch" else f"{engine}, ") + f"{result['device']}, {result['dtype']}"


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@contextlib.contextmanager
def progress_view(quiet: bool = False):
    """Yield the CLI's listener for the library's progress protocol (lbdl_cli.progress.Event).

    On a terminal: one rich bar per stage (done/total in the stage's unit, elapsed, ETA when the
    total is known, the status text), messages printed above the bars. In a pipe or with `quiet`
    (--json): nothing but warnings, which always reach stderr."""
    from ..progress import Event

    live = not quiet and err_console.is_terminal
    if not live:
        def listen(event: Event) -> None:
            if event.message and event.level == "warning":
                err_console.print(f"[yellow]warning:[/yellow] {esc(event.message)}", soft_wrap=True)

        yield listen
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    tasks: dict[str, int] = {}
    with Progress(*columns, console=err_console.real(), transient=False) as bar:
        def listen(event: Event) -> None:
            if event.message:
                style = "[yellow]warning:[/yellow] " if event.level == "warning" else ""
                bar.console.print(style + esc(event.message), soft_wrap=True)
            if not event.done and event.total is None and not event.status and event.message:
                return  # a message alone draws no bar
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=event.total, count="", status="")
            bar.update(tasks[event.stage], completed=event.done, total=event.total,
                       count=_count(event.done, event.total, event.unit), status=esc(event.status))

        yield listen


def _count(done: float, total: float | None, unit: str) -> str:
    """"12.3/45.6 MiB", "120/400 steps", "7 windows": the stage's units, bytes in binary units."""
    if unit == "bytes":
        shown = human_bytes(done) + (f"/{human_bytes(total)}" if total else "")
    else:
        shown = f"{done:,.0f}" + (f"/{total:,.0f}" if total else "") + (f" {unit}" if unit else "")
    return shown

