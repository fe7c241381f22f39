"""`lbdl info`, `lbdl init`, `lbdl presets`: model directories and presets."""

from __future__ import annotations

from typing import Optional

import typer

from ..checkpoint.configs import InitConfig
from .options import build, config_options, model_argument, out_option
from .output import (
    FORCE_OPTION,
    JSON_OPTION,
    console,
    emit,
    esc,
    human_bytes,
    human_count,
    inline,
    kv_table,
)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("init")(init)
    app.command("presets")(presets)


def info(
    ctx: typer.Context,
    model: Optional[str] = model_argument("Model directory (optional with --system).", required=False),
    system: bool = typer.Option(False, "--system", help="Show this machine: the CPU's capabilities, the kernel "
                                "probe's timings and what they chose."),
    as_json: bool = JSON_OPTION,
):
    """Show a model's config, parameter count, size, dtype, tokenizer and quantization; or this machine (--system)."""
    if model is None and not system:
        ctx.fail("Missing argument 'MODEL': give a model directory, or --system.")
    if system:
        from ..kernels import system_info

        machine = system_info()
    if model is None:
        emit(machine, as_json, lambda: render_system(machine))
        return
    from ..checkpoint import model_info

    result = model_info(model)
    if system:
        result["system"] = machine

    def render():
        console.print(f"[bold]{esc(result['path'])}[/bold]  (format_version {result['format_version']})")
        rows = {
            "parameters": f"{human_count(result['params'])} ({result['params']:,})",
            "forward GFLOPs/token": f"{result['flops_per_token'] / 1e9:.4f}",
            "size on disk": human_bytes(result["size_bytes"]),
            "dtype": ", ".join(result["dtypes"]),
            "bits per weight": f"{result['bits_per_weight']:.2f}",
            "tokenizer": inline(result["tokenizer"]) if result["tokenizer"] else "none",
        }
        for section in ("quantization", "training", "source"):
            if section in result:
                rows[section] = inline(result[section])
        console.print(kv_table({k: esc(v) for k, v in rows.items()}))
        console.print(kv_table(result["model"], title="config"))
        if "quantization" in result:  # each tensor's type
            from rich.table import Table

            table = Table("tensor", "shape", "type", "size", title="tensors")
            for t in result["tensors"]:
                table.add_row(t["name"], "x".join(map(str, t["shape"])), t["type"], human_bytes(t["bytes"]))
            console.print(table)
        if system:
            render_system(machine)

    emit(result, as_json, render)


def render_system(machine: dict) -> None:
    """The CPU, the probe's timings and the choices, as tables."""
    from rich.table import Table

    cpu = machine["cpu"]
    console.print(kv_table({
        "cpu": esc(cpu["model"]), "torch": cpu["torch"], "vector ISA": cpu["capability"],
        "AVX-512": _yes(cpu["avx512"]), "AVX-512 bf16": _yes(cpu["avx512_bf16"]), "AMX": _yes(cpu["amx"]),
        "native bfloat16 (oneDNN)": _yes(cpu["native_bf16"]), "threads": cpu["threads"],
    }, title="CPU"))
    probe = machine["probe"]
    table = Table("product (1024 x 1024)", "microseconds", title=f"kernel probe ({esc(probe['cache'])})")
    for name, us in probe["timings_us"].items():
        table.add_row(name.replace("_", " "), f"{us:,.1f}")
    console.print(table)
    console.print(kv_table({k.replace("_", " "): v for k, v in machine["choices"].items()}, title="chosen"))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@config_options(InitConfig)
def init(
    out: str = out_option("Output model directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Create a freshly initialised model from a preset and check it with one forward pass."""
    from ..checkpoint import create_model

    cfg = build(InitConfig, fields)
    preset = cfg.preset
    result = create_model(out, cfg, force=force)

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
