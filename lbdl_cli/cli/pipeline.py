"""`lbdl pipeline run|validate|show FILE`: steps of lbdl commands in a TOML file, run with a cache (the format and
the cache's rules: lbdl_cli/pipeline/__init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from ..errors import ConfigError, RunFailed
from .options import DefaultCommandGroup, group
from .output import JSON_OPTION, console, emit, esc, progress_view

app = group("Pipeline files: run lbdl steps from a TOML file, each rerun only when its options or inputs changed "
            "(`lbdl pipeline run FILE`), check one (`validate`), or see what would run (`show`).")

FILE_ARG = typer.Argument(..., metavar="FILE", help="The pipeline file (TOML: [steps.NAME] tables).",
                          show_default=False)
SET_OPTION = typer.Option([], "--set", metavar="SETTING", help="Override a step's field: STEP.field=value (the "
                          "value read as TOML: 20, 1e-3, true, [\"a\", \"b\"], else text); repeatable. [default: none]")
FORCE_OPTION = typer.Option(None, "--force", metavar="STEP", help="Rerun every step (--force alone), or the named "
                            "one. [default: none]")
ALL = "*"  # the value of a bare --force


class ForceCommand(TyperCommand):
    """--force with an optional STEP: a bare --force (last, before another option, or before the .toml file)
    means every step."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            nxt = args[i + 1] if i + 1 < len(args) else None
            if arg == "--force" and (nxt is None or nxt.startswith("-") or nxt.endswith(".toml")):
                args[i] = f"--force={ALL}"
        return super().parse_args(ctx, args)
FROM_OPTION = typer.Option(None, "--from", metavar="STEP", help="Rerun this step and every step after it. "
                           "[default: none]")
ONLY_OPTION = typer.Option([], "--only", metavar="STEP", help="Run only this step (repeatable). [default: none]")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="pipeline")


def find_command(words: tuple):
    """The click command that `lbdl WORDS...` runs (a group with a default command: that command)."""
    from . import COMMANDS, _module_commands

    said = " ".join(words)
    if not words or words[0] not in COMMANDS or words[0] == "pipeline":
        import difflib

        close = difflib.get_close_matches(said, _all_commands(COMMANDS, _module_commands), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `lbdl --help`"
        why = "a step cannot run a pipeline" if words and words[0] == "pipeline" else f"unknown command {said!r}"
        raise ConfigError(f"{why}; {hint}")
    command = _module_commands(COMMANDS[words[0]][0])[words[0]]
    for i, word in enumerate(words[1:], 1):
        subs = getattr(command, "commands", None)
        if not subs or word not in subs:
            import difflib

            head, visible = " ".join(words[:i]), [n for n, c in (subs or {}).items() if not c.hidden]
            close = difflib.get_close_matches(word, visible, n=1)
            known = f"did you mean '{head} {close[0]}'?" if close else \
                f"its commands: {', '.join(visible)}" if subs else "it takes no sub-command"
            raise ConfigError(f"unknown command {said!r}: `lbdl {head}` has no {word!r} ({known})")
        command = subs[word]
    if hasattr(command, "commands"):
        if not isinstance(command, DefaultCommandGroup):
            names = ", ".join(f"{said} {n}" for n, c in command.commands.items() if not c.hidden)
            raise ConfigError(f"{said!r} is a group of commands; name one: {names}")
        command = next(iter(command.commands.values()))
    return command


def _all_commands(commands: dict, module_commands) -> list[str]:
    names = []
    for name, (module, _) in commands.items():
        if name == "pipeline":
            continue
        command = module_commands(module)[name]
        subs = [n for n, c in getattr(command, "commands", {}).items() if not c.hidden]
        names += [f"{name} {s}" for s in subs] or [name]
    return names


def _load(file: str, sets: list[str]):
    from ..pipeline import read_pipeline

    return read_pipeline(Path(file), sets)


def _numbers(numbers: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}" for k, v in numbers.items())


@app.command("run", cls=ForceCommand)
def run(
    file: str = FILE_ARG,
    sets: List[str] = SET_OPTION,
    force: Optional[str] = FORCE_OPTION,
    start: Optional[str] = FROM_OPTION,
    only: List[str] = ONLY_OPTION,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the equivalent shell commands and run nothing."),
    as_json: bool = JSON_OPTION,
):
    """Run a pipeline's steps in order; a step whose options, inputs and lbdl version are unchanged is cached."""
    from ..pipeline import command_lines, run_pipeline, selection, shell_script

    pipeline = _load(file, sets)
    choice = dict(force=() if force in (None, ALL) else (force,), force_all=force == ALL, only=tuple(only),
                  start=start)
    if dry_run:
        lines = command_lines(pipeline, find_command)
        chosen, _ = selection(pipeline, **choice)
        script = shell_script(pipeline, lines, chosen)
        emit({"pipeline": str(pipeline.path), "commands": script}, as_json, lambda: print("\n".join(script)))
        return
    with progress_view(quiet=as_json) as listen:
        result = run_pipeline(pipeline, find_command, progress=listen, **choice)

    def render():
        from rich.table import Table

        table = Table("step", "command", "status", "seconds", "results")
        colour = {"ran": "green", "cached": "cyan", "failed": "red"}
        for row in result["steps"]:
            status = row["status"]
            shown = f"[{colour[status]}]{status}[/{colour[status]}]" if status in colour else status
            table.add_row(esc(row["step"]), esc(row["command"]), shown, f"{row['seconds']:.1f}",
                          esc(_numbers(row["numbers"])))
        console.print(table)
        counts = {s: sum(r["status"] == s for r in result["steps"]) for s in ("ran", "cached", "failed")}
        console.print(f"{counts['ran']} ran, {counts['cached']} cached in {result['seconds']:.1f} s")
        if result.get("report"):
            console.print(f"report: {esc(result['report']['files'][0])}"
                          + ("" if result["report"]["written"] else " (unchanged)"))

    emit(result, as_json, render)
    if not result["ok"]:
        raise RunFailed(f"step {result['failed']} failed: {result['error']} (fix it and run again: the steps "
                        f"before it are cached)")


@app.command("validate")
def validate(
    file: str = FILE_ARG,
    sets: List[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Check a pipeline without running it: commands, fields, values, references and cycles, each with its line."""
    from ..pipeline import check

    pipeline = _load(file, sets)
    _, problems = check(pipeline, find_command)
    texts = [p.text(pipeline.path) for p in problems]
    result = {"pipeline": str(pipeline.path), "ok": not problems, "steps": list(pipeline.order),
              "problems": [{"line": p.line, "step": p.step, "message": p.message, "text": t}
                           for p, t in zip(problems, texts)]}

    def render():
        for text in texts:
            console.print(esc(text))
        if not problems:
            console.print(f"{esc(file)}: {len(pipeline.order)} steps, no problems")

    emit(result, as_json, render)
    if problems:
        raise ConfigError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in {file}"
                          + ("" if as_json else " (listed above)"))


@app.command("show", cls=ForceCommand)
def show(
    file: str = FILE_ARG,
    sets: List[str] = SET_OPTION,
    force: Optional[str] = FORCE_OPTION,
    start: Optional[str] = FROM_OPTION,
    only: List[str] = ONLY_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Show the step graph and what a run would do now: cached, run (and why), or run after an upstream step."""
    from ..pipeline import show as show_pipeline

    pipeline = _load(file, sets)
    result = show_pipeline(pipeline, find_command, force=() if force in (None, ALL) else (force,),
                           force_all=force == ALL, only=tuple(only), start=start)

    def render():
        from rich.table import Table

        table = Table("step", "command", "needs", "out", "now")
        for row in result["steps"]:
            now = row["status"] + (f" ({row['why']})" if row["why"] else "")
            table.add_row(esc(row["step"]), esc(row["command"]), esc(", ".join(row["needs"]) or "-"),
                          esc(row["out"] or "-"), esc(now))
        console.print(table)
        console.print(f"workdir {esc(result['workdir'])}")

    emit(result, as_json, render)
