"""`lbdl import`, `lbdl export` (Hugging Face transformers directories, GGUF files) and `lbdl convert` (dtype)."""

from __future__ import annotations

import typer

from ..checkpoint.configs import ConvertConfig, ExportConfig, ImportConfig
from .options import build, config_options, model_argument, out_option
from .output import FORCE_OPTION, JSON_OPTION, console, emit, human_bytes, human_count


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
    app.command("export")(export)
    app.command("convert")(convert)


@config_options(ImportConfig)
def import_(
    source: str = typer.Argument(..., metavar="SOURCE",
                                 help="A transformers directory (GPT2LMHeadModel or LlamaForCausalLM) or a GGUF "
                                      "file (gpt2 or llama)."),
    out: str = out_option("Output lbdl model directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Import a Hugging Face model directory (safetensors, single or sharded) or a GGUF file."""
    from pathlib import Path

    from ..errors import ConfigError

    cfg = build(ImportConfig, fields)
    if Path(source).is_dir():
        if cfg.dequantize:
            raise ConfigError("--dequantize applies to a GGUF file; a Hugging Face directory holds float weights")
        from ..checkpoint.hf import import_hf

        result = import_hf(source, out, dtype=cfg.weights_dtype, force=force)
    else:
        from ..checkpoint.gguf_import import import_gguf

        result = import_gguf(source, out, dtype=cfg.weights_dtype, dequantize=cfg.dequantize, force=force)
    kept = ", ".join(f"{n} {t}" for t, n in result.get("quantized", {}).items())
    emit(result, as_json, lambda: console.print(
        f"imported {result['architecture']} from {source} -> {result['out']}: "
        f"{human_count(result['params'])} parameters, {result['dtype']}"
        + (f"; quantized tensors kept: {kept}" if kept else "")
        + (f"; dequantized: {len(result['dequantized'])} tensors" if result.get("dequantized") else "")))


@config_options(ExportConfig)
def export(
    model: str = model_argument(),
    out: str = out_option("Output: a directory (--to hf) or a .gguf file (--to gguf)."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Export a model for another tool: `--to hf` writes a transformers directory, `--to gguf` a llama.cpp file."""
    cfg = build(ExportConfig, fields)
    if cfg.to == "gguf":
        from ..checkpoint.gguf import export_gguf

        result = export_gguf(model, out, dtype=cfg.weights_dtype, force=force)
        emit(result, as_json, lambda: console.print(
            f"exported {model} as GGUF {result['architecture']} {result['file_type']} -> {result['out']} "
            f"({result['tensors']} tensors, {human_bytes(result['size_bytes'])})"))
        return
    from ..checkpoint.hf import export_hf

    result = export_hf(model, out, force=force, dtype=cfg.weights_dtype)
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
