"""`lbdl quantize MODEL --type T --out DIR` and `lbdl quantize sweep MODEL --eval FILE`."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from .output import DTYPE_OPTION, FORCE_OPTION, JSON_OPTION, console, emit, human_bytes, human_count, note, progress

TYPES_HELP = "q8_0, q5_1, q5_0, q4_1, q4_0, q5_k, q4_k, nf4, nf4_dq"


class _DefaultCommandGroup(TyperGroup):
    """`lbdl quantize MODEL ...` runs the hidden `model` command; `lbdl quantize sweep ...` the sweep."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultCommandGroup, no_args_is_help=True,
    help="Quantize a model: `lbdl quantize MODEL --type q4_k --out DIR` (see `lbdl quantize MODEL --help`), "
         "or compare every type: `lbdl quantize sweep MODEL --eval FILE`.",
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="quantize")


@app.command("model", hidden=True)
def quantize(
    model: str = typer.Argument(..., help="Full-precision model directory."),
    qtype: str = typer.Option(..., "--type", help=f"Quantization type: {TYPES_HELP}."),
    out: str = typer.Option(..., "--out", help="Output model directory."),
    recipe: str = typer.Option("pure", "--recipe", help="pure | s | m | l: give attention V (s), and the "
                                                        "feed-forward down (m) or all feed-forward (l) weights more bits."),
    embeddings: str = typer.Option("q8_0", "--embeddings", help="Type of the token embeddings and head: a type, "
                                                                "'same' (--type) or 'keep' (full precision)."),
    calibrate: str = typer.Option(None, "--calibrate", help="Text file: importance weights from squared input "
                                                            "activations (imatrix) guide the scale search."),
    ctx: int = typer.Option(None, "--ctx", help="Calibration window in tokens (default: the model's context)."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Quantize MODEL into a model directory that generate, eval, info and finetune load directly."""
    from quant.recipe import quantize_dir

    with progress("quantizing", quiet=as_json) as update:
        result = quantize_dir(model, out, qtype, recipe=recipe, embeddings=embeddings, calibrate=calibrate, ctx=ctx,
                              force=force, progress=lambda n=1: update(n))

    def render():
        ratio = result["original_bytes"] / result["weights_bytes"]
        console.print(f"quantized {model} -> {result['out']} ({result['name']}): "
                      f"{result['bits_per_weight']:.2f} bits per weight, {human_bytes(result['weights_bytes'])} of "
                      f"weights (was {human_bytes(result['original_bytes'])}, {ratio:.1f}x smaller) in "
                      f"{result['seconds']:.1f}s")
        by_type: dict[str, list] = {}
        for t in result["tensors"]:
            by_type.setdefault(t["type"], []).append(t)
        from rich.table import Table

        table = Table("type", "tensors", "parameters", "size", "bits/weight")
        for name, ts in sorted(by_type.items(), key=lambda kv: -sum(t["bytes"] for t in kv[1])):
            n = sum(_numel(t["shape"]) for t in ts)
            b = sum(t["bytes"] for t in ts)
            table.add_row(name, str(len(ts)), human_count(n), human_bytes(b), f"{8 * b / n:.2f}")
        console.print(table)
        for name, why in result["kept"].items():
            console.print(f"kept in full precision: {name} ({why})")
        if result.get("calibration"):
            c = result["calibration"]
            console.print(f"calibrated on {c['file']}: {c['tokens']} tokens in {c['windows']} windows of {c['ctx']}")

    emit(result, as_json, render)


@app.command("sweep")
def sweep(
    model: str = typer.Argument(..., help="Full-precision model directory."),
    eval_file: str = typer.Option(..., "--eval", help="UTF-8 text whose perplexity each variant is scored on."),
    out: str = typer.Option(None, "--out", help="Directory for sweep.json, sweep.md and sweep.png."),
    types: str = typer.Option(None, "--types", help=f"Comma-separated types (default: all of {TYPES_HELP})."),
    recipes: str = typer.Option(None, "--recipes", help="Comma-separated recipes (default: pure,s,m,l)."),
    embeddings: str = typer.Option("q8_0", "--embeddings", help="Type of the token embeddings and head: a type, "
                                                                "'same' or 'keep'."),
    calibrate: str = typer.Option(None, "--calibrate", help="Text file: also quantize each type with importance "
                                                            "weights and report the share of the perplexity "
                                                            "increase they remove."),
    ctx: int = typer.Option(None, "--ctx", help="Evaluation window (default: the model's context)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    dtype: str = DTYPE_OPTION,
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Bits per weight, size, perplexity and KL divergence from MODEL of every type and recipe, with a plot
    (LBDL fig. 8.2)."""
    import json

    from quant.sweep import markdown_table, plot_sweep
    from quant.sweep import sweep as run_sweep

    from ..atomic import atomic_dir, check_out
    from ..checkpoint import parse_dtype

    if out is not None:
        check_out(out, force)
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None)
    with progress("sweep", quiet=as_json) as update:
        result = run_sweep(model, eval_file, types=split(types), recipes=split(recipes), embeddings=embeddings,
                           calibrate=calibrate, ctx=ctx, batch_size=batch_size, dtype=parse_dtype(dtype),
                           progress=lambda done, total: update(1, total=total))
    if out is not None:
        with atomic_dir(out, force=force) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "sweep.md").write_text(markdown_table(result) + "\n")
            plot_sweep(result, tmp / "sweep.png")
        result["files"] = [f"{out}/sweep.json", f"{out}/sweep.md", f"{out}/sweep.png"]

    def render():
        from rich.table import Table

        b = result["baseline"]
        console.print(f"{model}: perplexity {b['perplexity']:.4f} ± {b['std_error']:.4f} ({b['name']}) on "
                      f"{result['tokens']} tokens of {eval_file}, ctx {result['ctx']}")
        table = Table("variant", "bits/weight", "size", "perplexity", "change %", "KL div.", "same top",
                      *(["removed (ppl/KLD)"] if result.get("calibration") else []))
        for r in [b, *result["rows"]]:
            extra = []
            if result.get("calibration"):
                pct = lambda v: f"{100 * v:.0f}%" if v is not None else "-"  # noqa: E731
                extra = [f"{pct(r.get('removed'))} / {pct(r.get('kld_removed'))}" if r.get("calibrated") else ""]
            table.add_row(r["name"], f"{r['bits_per_weight']:.2f}", human_bytes(r["size_bytes"]),
                          f"{r['perplexity']:.3f}", f"{r['delta_pct']:+.2f}%", f"{r['kld']:.5f}",
                          f"{100 * r['same_top']:.1f}%", *extra)
        console.print(table)
        if out is not None:
            note(f"wrote {', '.join(result['files'])}")

    emit(result, as_json, render)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

