"""`lbdl eval perplexity|task`: perplexity and bits per byte of a text, accuracy on a task file."""

from __future__ import annotations

from typing import Optional

import typer

from ..evaluate import EXTRACT_METHODS
from .output import DEVICE_OPTION, DTYPE_OPTION, JSON_OPTION, console, emit, progress

app = typer.Typer(help="Evaluate a model: perplexity of a text, accuracy on a task file.", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="eval")


def _progress(update):
    seen = {"done": 0}

    def callback(done: int, total: int):
        update(advance=done - seen["done"], total=total)
        seen["done"] = done

    return callback


@app.command("perplexity")
def perplexity(
    model: str = typer.Argument(..., help="Model directory."),
    file: str = typer.Argument(..., help="UTF-8 text file to score."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Window length in tokens (default: the model's context)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Sliding windows every S tokens, each scoring its new tokens "
                                         "(default: llama.cpp's non-overlapping windows, second half scored)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Perplexity, mean NLL, bits per byte and a standard error of a model on a text file."""
    from ..evaluate import perplexity_of_file
    from ..sample import resolve_device

    device = resolve_device(device)
    with progress("perplexity", total=None, quiet=as_json) as update:
        result = perplexity_of_file(model, file, ctx=ctx, stride=stride, batch_size=batch_size, dtype=dtype,
                                    device=device, progress=_progress(update))

    def render():
        how = (f"llama.cpp convention: {result['windows']} windows of {result['ctx']} tokens, second half of each scored"
               if result["stride"] is None else
               f"sliding windows of {result['ctx']} tokens every {result['stride']}: {result['windows']} windows")
        console.print(f"[bold]perplexity[/bold] {result['perplexity']:.4f} ± {result['std_error']:.4f}  ({how})")
        console.print(f"[bold]mean NLL[/bold]   {result['nll']:.4f} ± {result['nll_std_error']:.4f} nats/token")
        if "bits_per_byte" in result:
            console.print(f"[bold]bits/byte[/bold]  {result['bits_per_byte']:.4f}")
        console.print(f"[bold]tokens[/bold]     {result['tokens']:,} scored, {result['tokens_evaluated']:,} evaluated "
                      f"({result['file_tokens']:,} in the file); {result['tokens_per_s']:,.0f} tokens/s "
                      f"({result['device']}, {result['dtype']})")

    emit(result, as_json, render)


@app.command("task")
def task(
    model: str = typer.Argument(..., help="Model directory."),
    tasks: str = typer.Argument(..., help='JSONL file: one {"prompt": ..., "answer": ...} per line.'),
    extract: str = typer.Option("auto", "--extract", help=f"How to read the answer from a completion: {' | '.join(EXTRACT_METHODS)} "
                                "(auto: choice if the record lists choices, number if the answer is one, else exact)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="Regular expression for --extract regex (group 1 is the answer)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens per completion at most."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop strings (repeatable; default: a line break; \\n is one)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate() call."),
    show: int = typer.Option(0, "--show", help="Print the first N records with their completions."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Exact-match accuracy of greedy completions on a JSONL task file, with a 95% confidence interval."""
    from ..evaluate import task_accuracy_of_file
    from ..sample import SamplingConfig
    from .generate import _unescape
    from ..sample import resolve_device

    stops = tuple(_unescape(s) for s in stop) if stop else ("\n",)
    config = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop=stops)
    if extract not in EXTRACT_METHODS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown --extract {extract!r}; choose one of {', '.join(EXTRACT_METHODS)}")
    device = resolve_device(device)
    with progress("eval task", total=None, quiet=as_json) as update:
        result = task_accuracy_of_file(model, tasks, config, extract=extract, pattern=pattern, batch_size=batch_size,
                                       dtype=dtype, device=device, progress=_progress(update))

    def render():
        from rich.markup import escape
        from rich.table import Table

        if show:
            table = Table("line", "answer", "predicted", "", "completion")
            for r in result["records"][:show]:
                table.add_row(str(r["line"]), escape(str(r["answer"])), escape(str(r["predicted"])),
                              "[green]yes[/green]" if r["correct"] else "[red]no[/red]", escape(repr(r["completion"])))
            console.print(table)
        lo, hi = result["ci95"]
        console.print(f"[bold]accuracy[/bold] {result['accuracy']:.4f} ({result['correct']}/{result['total']}), "
                      f"95% CI [{lo:.4f}, {hi:.4f}] (Wilson); extraction {result['extract']}, "
                      f"{result['seconds']:.1f} s")

    emit(result, as_json, render)
