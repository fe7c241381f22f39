"""`lbdl info`, `lbdl init`, `lbdl presets`: model directories and presets."""

from __future__ import annotations

import typer

from .output import (DTYPE_OPTION, FORCE_OPTION, JSON_OPTION, SEED_OPTION, console, emit, human_bytes,
                     human_count, kv_table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("init")(init)
    app.command("presets")(presets)


def info(
    model: str = typer.Argument(..., help="Model directory."),
    as_json: bool = JSON_OPTION,
):
    """Show a model's config, parameter count, size, dtype, tokenizer and quantization."""
    from ..checkpoint import model_info

    result = model_info(model)

    def render():
        console.print(f"[bold]{result['path']}[/bold]  (format_version {result['format_version']})")
        rows = {
            "parameters": f"{human_count(result['params'])} ({result['params']:,})",
            "forward GFLOPs/token": f"{result['flops_per_token'] / 1e9:.4f}",
            "size on disk": human_bytes(result["size_bytes"]),
            "dtype": ", ".join(result["dtypes"]),
            "bits per weight": f"{result['bits_per_weight']:.2f}",
            "tokenizer": result["tokenizer"] or "none",
        }
        for section in ("quantization", "training", "source"):
            if section in result:
                rows[section] = result[section]
        console.print(kv_table(rows))
        console.print(kv_table(result["model"], title="config"))
        if "quantization" in result:  # each tensor's type
            from rich.table import Table

            table = Table("tensor", "shape", "type", "size", title="tensors")
            for t in result["tensors"]:
                table.add_row(t["name"], "x".join(map(str, t["shape"])), t["type"], human_bytes(t["bytes"]))
            console.print(table)

    emit(result, as_json, render)


def init(
    preset: str = typer.Option(..., "--preset", help="Model preset (see `lbdl presets`)."),
    out: str = typer.Option(..., "--out", help="Output model directory."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="Override the preset's vocabulary size."),
    block_size: int = typer.Option(None, "--block-size", help="Override the preset's context length."),
    seed: int = SEED_OPTION,
    dtype: str = DTYPE_OPTION,
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Create a freshly initialised model from a preset and check it with one forward pass."""
    from ..checkpoint import create_model

    result = create_model(preset, out, vocab_size=vocab_size, block_size=block_size, seed=seed,
                          dtype=dtype, force=force)

    def render():
        gap = result["initial_loss"] - result["ln_vocab"]
        verdict = "[green]ok[/green]" if abs(gap) <= 0.1 else "[yellow]off by more than 0.1[/yellow]"
        console.print(f"created {result['out']} from preset {preset}: {human_count(result['params'])} parameters, "
                      f"{result['dtype']}")
        console.print(f"forward pass on random tokens: loss {result['initial_loss']:.4f}, "
                      f"ln(V) = {result['ln_vocab']:.4f} ({verdict})")

    emit(result, as_json, render)


def presets(as_json: bool = JSON_OPTION):
    """List the model presets with their shapes and parameter counts."""
    from rich.table import Table

    from ..checkpoint import load_preset, preset_names
    from ..model import count_params

    rows = []
    for name in preset_names():
        cfg, description = load_preset(name)
        rows.append({"name": name, "params": count_params(cfg), "description": description, "model": cfg.to_dict()})

    def render():
        table = Table("preset", "params", "layers", "heads (kv)", "n_embd", "context", "family")
        for r in rows:
            m = r["model"]
            family = "llama" if m["mlp"] == "swiglu" else "gpt2"
            table.add_row(r["name"], human_count(r["params"]), str(m["n_layer"]), f"{m['n_head']} ({m['n_kv_head']})",
                          str(m["n_embd"]), str(m["block_size"]), family)
        console.print(table)

    emit({"presets": rows}, as_json, render)
