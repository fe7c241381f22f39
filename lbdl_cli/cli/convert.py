"""`lbdl import`, `lbdl export` (Hugging Face transformers directories) and `lbdl convert` (dtype)."""

from __future__ import annotations

import typer

from ..checkpoint.configs import ConvertConfig, ExportConfig, ImportConfig
from .options import build, config_options, model_argument, out_option
from .output import FORCE_OPTION, JSON_OPTION, console, emit, human_count


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
    app.command("export")(export)
    app.command("convert")(convert)


@config_options(ImportConfig)
def import_(
    hf_dir: str = typer.Argument(..., metavar="DIR",
                                 help="A transformers directory (GPT2LMHeadModel or LlamaForCausalLM)."),
    out: str = out_option("Output lbdl model directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Import a Hugging Face model directory (safetensors, single or sharded)."""
    from ..checkpoint.hf import import_hf

    result = import_hf(hf_dir, out, dtype=build(ImportConfig, fields).weights_dtype, force=force)
    emit(result, as_json, lambda: console.print(
        f"imported {result['architecture']} from {hf_dir} -> {result['out']}: "
        f"{human_count(result['params'])} parameters, {result['dtype']}"))


@config_options(ExportConfig)
def export(
    model: str = model_argument(),
    out: str = out_option("Output directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Export a model for another tool: `--to hf` writes a transformers directory."""
    from ..checkpoint.hf import export_hf

    build(ExportConfig, fields)  # --to is checked; hf is the one format so far
    result = export_hf(model, out, force=force)
    emit(result, as_json, lambda: console.print(
        f"exported {model} as {result['architecture']} -> {result['out']} ({result['tensors']} tensors)"))


@config_options(ConvertConfig)
def convert(
    model: str = model_argument(),
    out: str = out_option("Output model directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Re-save a model with its weights in another dtype (bfloat16 halves the size)."""
    from ..checkpoint import convert_dtype

    result = convert_dtype(model, build(ConvertConfig, fields).weights_dtype, out, force=force)
    emit(result, as_json, lambda: console.print(
        f"wrote {result['out']}: {human_count(result['params'])} parameters in {result['dtype']}"))
