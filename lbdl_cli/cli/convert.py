"""`lbdl import`, `lbdl export` (Hugging Face transformers directories) and `lbdl convert` (dtype)."""

from __future__ import annotations

import typer

from .output import DTYPE_OPTION, FORCE_OPTION, JSON_OPTION, console, emit, human_count


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
    app.command("export")(export)
    app.command("convert")(convert)


def import_(
    hf_dir: str = typer.Argument(..., help="A transformers directory (GPT2LMHeadModel or LlamaForCausalLM)."),
    out: str = typer.Option(..., "--out", help="Output lbdl model directory."),
    dtype: str = DTYPE_OPTION,
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Import a Hugging Face model directory (safetensors, single or sharded)."""
    from ..checkpoint import parse_dtype
    from ..checkpoint.hf import import_hf

    result = import_hf(hf_dir, out, dtype=parse_dtype(dtype), force=force)
    emit(result, as_json, lambda: console.print(
        f"imported {result['architecture']} from {hf_dir} -> {result['out']}: "
        f"{human_count(result['params'])} parameters, {result['dtype']}"))


def export(
    model: str = typer.Argument(..., help="lbdl model directory."),
    to: str = typer.Option("hf", "--to", help="Target format: hf (transformers)."),
    out: str = typer.Option(..., "--out", help="Output directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Export a model for another tool: `--to hf` writes a transformers directory."""
    from ..checkpoint.hf import export_hf
    from ..errors import ConfigError

    if to != "hf":
        raise ConfigError(f"unknown export format {to!r}; valid formats: hf")
    result = export_hf(model, out, force=force)
    emit(result, as_json, lambda: console.print(
        f"exported {model} as {result['architecture']} -> {result['out']} ({result['tensors']} tensors)"))


def convert(
    model: str = typer.Argument(..., help="lbdl model directory."),
    dtype: str = typer.Option(..., "--dtype", help="float32 | bfloat16: the dtype of the stored weights."),
    out: str = typer.Option(..., "--out", help="Output model directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Re-save a model with its weights in another dtype (bfloat16 halves the size)."""
    from ..checkpoint import convert_dtype

    result = convert_dtype(model, dtype, out, force=force)
    emit(result, as_json, lambda: console.print(
        f"wrote {result['out']}: {human_count(result['params'])} parameters in {result['dtype']}"))
