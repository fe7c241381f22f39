"""`lbdl lora merge MODEL ADAPTER --out DIR`: a LoRA adapter folded into its base."""

from __future__ import annotations

from typing import Optional

import typer

from quant.catalog import TYPES

from .options import group, model_argument, optional, out_option
from .output import FORCE_OPTION, JSON_OPTION, console, emit, human_count, progress_view

app = group("LoRA adapters: merge one into its base model.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="lora")


@app.command("merge")
def merge(
    model: str = model_argument("The base model the adapter was trained on (a quantized one is dequantized)."),
    adapter: str = typer.Argument(..., metavar="ADAPTER", help="LoRA adapter directory (PEFT format)."),
    out: str = out_option("Output model directory."),
    quantize: Optional[str] = typer.Option(None, "--quantize", metavar="NAME",
                                           help=optional(f"Quantize the merged model to this type (one of "
                                                         f"{', '.join(TYPES)}).")),
    force_base: bool = typer.Option(False, "--force-base", help="Merge even when the base's content hash is not "
                                                                "the one the adapter recorded (shapes are checked)."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Merge a LoRA adapter into its base: W' = W + s B A, a model of the base's architecture."""
    import tempfile
    from pathlib import Path

    from ..atomic import check_out
    from ..lora import merge_adapter_dir
    from ..quantize import QuantizeConfig, quantize_dir

    if quantize is None:
        result = merge_adapter_dir(model, adapter, out, force=force, force_base=force_base)
    else:
        cfg = QuantizeConfig(type=quantize)  # checked before any work
        check_out(out, force, inputs=(model, adapter))
        with tempfile.TemporaryDirectory(dir=Path(out).absolute().parent, prefix=f".{Path(out).name}.merge-") as tmp:
            result = merge_adapter_dir(model, adapter, Path(tmp) / "merged", force_base=force_base)
            with progress_view(quiet=as_json) as listen:
                quantized = quantize_dir(Path(tmp) / "merged", out, cfg, force=force, progress=listen)
        result = {**result, "out": str(out), "quantized": quantized["name"]}
    emit(result, as_json, lambda: console.print(
        f"merged {result['merged']} adapters of {adapter} into {model} -> {result['out']}: "
        f"{human_count(result['params'])} parameters"
        + (f", quantized {result['quantized']}" if quantize else "")
        + (" (the quantized base was dequantized)" if result["dequantized"] else "")))
