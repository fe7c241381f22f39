"""`lbdl quantize MODEL --type T --out DIR` and `lbdl quantize sweep MODEL --eval FILE`."""

from __future__ import annotations

import math

import typer

from ..quantize import QuantizeConfig, SweepConfig
from .options import (
    DefaultCommand,
    DefaultCommandGroup,
    build,
    config_options,
    file_option,
    group,
    model_argument,
    out_option,
)
from .output import FORCE_OPTION, JSON_OPTION, console, emit, human_bytes, human_count, note, progress_view

app = group(
    cls=DefaultCommandGroup,
    help="Quantize a model: `lbdl quantize MODEL --type q4_k --out DIR` (see `lbdl quantize MODEL --help`), "
         "or compare every type: `lbdl quantize sweep MODEL --eval FILE`.",
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="quantize")


@app.command("model", hidden=True, cls=DefaultCommand)
@config_options(QuantizeConfig)
def quantize(
    model: str = model_argument("Full-precision model directory."),
    out: str = out_option("Output model directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Quantize MODEL into a model directory that generate, eval and info load directly."""
    from ..quantize import quantize_dir

    cfg = build(QuantizeConfig, fields)
    with progress_view(quiet=as_json) as listen:
        result = quantize_dir(model, out, cfg, force=force, progress=listen)
    emit(result, as_json, lambda: _render_quantized(model, result))


@app.command("sweep")
@config_options(SweepConfig)
def sweep(
    model: str = model_argument("Full-precision model directory."),
    eval_file: str = file_option("--eval", "UTF-8 text whose perplexity each variant is scored on.", "evaluation text",
                                 required=True),
    out: str = out_option("Directory for sweep.json, sweep.md and sweep.png.", required=False),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Bits per weight, size, perplexity and KL divergence from MODEL of every type and recipe, with a plot
    (LBDL fig. 8.2)."""
    from ..quantize import run_sweep

    cfg = build(SweepConfig, fields)
    with progress_view(quiet=as_json) as listen:
        result = run_sweep(model, eval_file, cfg, out=out, force=force, progress=listen)
    emit(result, as_json, lambda: _render_sweep(model, eval_file, result))


def _render_quantized(model: str, result: dict) -> None:
    from rich.table import Table

    ratio = result["original_bytes"] / result["weights_bytes"]
    console.print(f"quantized {model} -> {result['out']} ({result['name']}): "
                  f"{result['bits_per_weight']:.2f} bits per weight, {human_bytes(result['weights_bytes'])} of "
                  f"weights (was {human_bytes(result['original_bytes'])}, {ratio:.1f}x smaller) in "
                  f"{result['seconds']:.1f}s")
    by_type: dict[str, list] = {}
    for t in result["tensors"]:
        by_type.setdefault(t["type"], []).append(t)
    table = Table("type", "tensors", "parameters", "size", "bits/weight")
    for name, ts in sorted(by_type.items(), key=lambda kv: -sum(t["bytes"] for t in kv[1])):
        n = sum(math.prod(t["shape"]) for t in ts)
        b = sum(t["bytes"] for t in ts)
        table.add_row(name, str(len(ts)), human_count(n), human_bytes(b), f"{8 * b / n:.2f}")
    console.print(table)
    for name, why in result["kept"].items():
        console.print(f"kept in full precision: {name} ({why})")
    if result.get("calibration"):
        c = result["calibration"]
        console.print(f"calibrated on {c['file']}: {c['tokens']} tokens in {c['windows']} windows of {c['ctx']}")


def _render_sweep(model: str, eval_file: str, result: dict) -> None:
    from rich.table import Table

    b = result["baseline"]
    console.print(f"{model}: perplexity {b['perplexity']:.4f} ± {b['std_error']:.4f} ({b['name']}) on "
                  f"{result['tokens']} tokens of {eval_file}, context {result['ctx']}")
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
    if result["reference"]["top_k"] is not None:
        note(f"KL divergence from the reference's {result['reference']['logprobs']}")
    if result.get("files"):
        note(f"wrote {', '.join(result['files'])}")

