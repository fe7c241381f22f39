"""`lbdl eval perplexity|task`: perplexity and bits per byte of a text, accuracy on a task file."""

from __future__ import annotations

import typer

from ..evaluate import PerplexityConfig, TaskConfig
from ..prompting import PromptConfig
from .options import build, config_options, file_argument, group, model_argument
from .output import JSON_OPTION, console, emit, esc, progress_view, runs_on

app = group("Evaluate a model: perplexity of a text, accuracy on a task file.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="eval")


@app.command("perplexity")
@config_options(PerplexityConfig)
def perplexity(
    model: str = model_argument(),
    file: str = file_argument("UTF-8 text file to score.", "text file"),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Perplexity, mean NLL, bits per byte and a standard error of a model on a text file."""
    from ..evaluate import perplexity_of_file

    cfg = build(PerplexityConfig, fields)
    with progress_view(quiet=as_json) as listen:
        result = perplexity_of_file(model, file, cfg, listen)

    def render():
        how = (f"llama.cpp convention: {result['windows']} windows of {result['ctx']} tokens, "
               f"second half of each scored"
               if result["stride"] is None else
               f"sliding windows of {result['ctx']} tokens every {result['stride']}: {result['windows']} windows")
        console.print(f"[bold]perplexity[/bold] {result['perplexity']:.4f} ± {result['std_error']:.4f}  ({how})")
        console.print(f"[bold]mean NLL[/bold]   {result['nll']:.4f} ± {result['nll_std_error']:.4f} nats/token")
        if "bits_per_byte" in result:
            console.print(f"[bold]bits/byte[/bold]  {result['bits_per_byte']:.4f}")
        console.print(f"[bold]tokens[/bold]     {result['tokens']:,} scored, {result['tokens_evaluated']:,} evaluated "
                      f"({result['file_tokens']:,} in the file); {result['tokens_per_s']:,.0f} tokens/s "
                      f"({runs_on(result)})")

    emit(result, as_json, render)


@app.command("task")
@config_options(PromptConfig, skip=("seed",))
@config_options(TaskConfig)
def task(
    model: str = model_argument(),
    tasks: str = file_argument('JSONL file: one {"prompt": ..., "answer": ...} per line.', "task file"),
    compare: list[str] = typer.Option([], "--compare", metavar="STRATEGY", help="Run several prompt strategies "
                                      "on the same records and report each one's paired difference from the first: "
                                      "direct, cot, self-consistency (repeat). [default: none]"),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Exact-match accuracy of greedy completions on a JSONL task file, with a 95% confidence interval."""
    from ..evaluate import task_accuracy_of_file

    cfg = build(TaskConfig, fields)
    prompt = build(PromptConfig, fields, base={"seed": cfg.seed})  # one --seed: the shots and the chains
    if compare:
        from ..evaluate import compare_strategies

        with progress_view(quiet=as_json) as listen:
            result = compare_strategies(model, tasks, cfg, prompt, compare, listen)
        emit({k: v for k, v in result.items() if k != "runs"} if not as_json else result, as_json,
             lambda: _render_comparison(result))
        return
    prompt = prompt if prompt != PromptConfig(seed=cfg.seed) else None  # the task file's prompts as they are
    with progress_view(quiet=as_json) as listen:
        result = task_accuracy_of_file(model, tasks, cfg, listen, prompt)

    def render():
        from rich.table import Table

        if cfg.show:
            table = Table("line", "answer", "predicted", "", "completion")
            for r in result["records"][:cfg.show]:
                table.add_row(str(r["line"]), esc(r["answer"]), esc(r["predicted"]),
                              "[green]yes[/green]" if r["correct"] else "[red]no[/red]", esc(repr(r["completion"])))
            console.print(table)
        lo, hi = result["ci95"]
        if "prompt" in result:
            p = result["prompt"]
            lo_s, hi_s = p["shots_used"]
            shots = f"{lo_s}" if lo_s == hi_s else f"{lo_s}-{hi_s}"
            console.print(f"prompt: {p['format']}, {shots} shots{', chain of thought' if p['cot'] else ''}"
                          + (f" ({p['shots_dropped']} dropped to fit the context)" if p["shots_dropped"] else ""))
        if result["chains"] > 1:
            console.print(f"self-consistency: the majority answer of {result['chains']} chains per record")
        console.print(f"[bold]accuracy[/bold] {result['accuracy']:.4f} ({result['correct']}/{result['total']}), "
                      f"95% CI [{lo:.4f}, {hi:.4f}] (Wilson); extraction {result['extract']}, "
                      f"{result['seconds']:.1f} s")

    emit(result, as_json, render)


def _render_comparison(result: dict) -> None:
    for row in result["strategies"]:
        lo, hi = row["ci95"]
        console.print(f"{row['strategy']:<17} accuracy {row['accuracy']:.4f} ({row['correct']}/{row['total']}), "
                      f"95% CI [{lo:.4f}, {hi:.4f}]; {row['chains']} chain(s), temperature {row['temperature']:g}")
    for pair in result["paired"]:
        lo, hi = pair["ci95"]
        console.print(f"{pair['b']} - {pair['a']}: {pair['difference']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]; "
                      f"right only with {pair['b']} {pair['only_b']}, only with {pair['a']} {pair['only_a']}; "
                      f"McNemar p = {pair['mcnemar_p']:.3g}")
