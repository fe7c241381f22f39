"""`lbdl merge --base B --model M1 --model M2 --method ties --out DIR` (and `--config merge.toml`, `--list`), and
`lbdl merge search ... --eval TASKS.jsonl --out DIR` (CMA-ES over merge weights or layer recombinations)."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..errors import ConfigError
from ..merge.config import MergeConfig, MergeFlags, read_merge_config
from ..merge.search import SearchConfig
from .options import DefaultCommand, DefaultCommandGroup, build, config_options, group, optional, out_option
from .output import FORCE_OPTION, JSON_OPTION, console, emit, progress_view

app = group(
    cls=DefaultCommandGroup,
    help="Merge fine-tunes of one base: task arithmetic, TIES, DARE, SLERP, layer recombination: `lbdl merge "
         "--base B --model M1 --model M2 --out DIR` (see `lbdl merge run --help`, `lbdl merge --list`), or search "
         "a merge scored on tasks: `lbdl merge search`.",
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="merge")


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, got {text!r}") from None


def _param(text: str) -> tuple[str, object]:
    """--param NAME=VALUE: a number, true/false, or a comma list (a gradient over depth)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--param takes NAME=VALUE (e.g. normalize=false, density=0.2,0.8), got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    parts = [_number(v, f"--param {name}") for v in value.split(",")]
    return name, parts if len(parts) > 1 else parts[0]


def _slice(text: str) -> dict:
    """--slice MODEL:FIRST:END (blocks FIRST..END-1 of MODEL)."""
    model, _, rest = text.rpartition(":")
    model, _, first = model.rpartition(":")
    try:
        return {"model": model, "layers": [int(first), int(rest)]}
    except ValueError:
        raise ConfigError(f"--slice takes MODEL:FIRST:END (blocks FIRST..END-1), got {text!r}") from None


@app.command("run", cls=DefaultCommand)
def merge(
    models: List[str] = typer.Option([], "--model", metavar="MODEL", help="A model directory to merge, or a LoRA "
                                     "adapter directory over --base (repeat for each). [default: none]"),
    weights: List[float] = typer.Option([], "--weight", metavar="X", help="The weight of each --model, in order; "
                                        "negative subtracts a task. [default: 1 each]"),
    base: Optional[str] = typer.Option(None, "--base", metavar="DIR", help=optional(
        "The model the others were fine-tuned from (task arithmetic, TIES, DARE).")),
    method: Optional[str] = typer.Option(None, "--method", metavar="NAME", help=optional(
        "Merge method (see --list); task_arithmetic when neither it nor --config gives one.")),
    density: Optional[float] = typer.Option(None, "--density", metavar="X", help=optional(
        "TIES/DARE: the fraction of each task vector kept.")),
    lambda_: Optional[float] = typer.Option(None, "--lambda", metavar="X", help=optional(
        "Task arithmetic, TIES, DARE: scale of the merged task vector.")),
    t: Optional[float] = typer.Option(None, "--t", metavar="X", help=optional("SLERP: 0 is the first model, 1 the "
                                                                            "second.")),
    params: List[str] = typer.Option([], "--param", metavar="PARAM", help="Any other method parameter as "
                                     "NAME=VALUE (normalize=false, rescale=true; a comma list is a gradient over "
                                     "depth). [default: none]"),
    slices: List[str] = typer.Option([], "--slice", metavar="SLICE", help="passthrough: MODEL:FIRST:END, blocks "
                                     "FIRST..END-1 of MODEL, in output order (repeat). [default: none]"),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help=optional("DARE's random drop (with each "
                                                                                 "tensor's name).")),
    dequantize: bool = typer.Option(False, "--dequantize", help="Accept quantized inputs, dequantized first."),
    config: Optional[str] = typer.Option(None, "--config", metavar="FILE", help=optional(
        "A merge config (TOML, or an output's merge.json); flags override it.")),
    list_methods: bool = typer.Option(False, "--list", help="List the merge methods, their parameters and papers."),
    out: Optional[str] = out_option("Output model directory.", required=False),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Merge models of one architecture and tokenizer, or LoRA adapters over --base, into a model directory, one
    tensor at a time (`lbdl merge ...` runs this command)."""
    if list_methods:
        from ..merge.methods import describe

        rows = describe()
        emit({"methods": rows}, as_json, lambda: _render_methods(rows))
        return
    from ..merge.driver import merge as run_merge

    if out is None:
        raise ConfigError("give the output model directory: --out DIR")
    MergeFlags(weights=tuple(weights), density=density, lambda_=lambda_, t=t, seed=seed)  # ranges, before any work
    values = read_merge_config(config).to_dict() if config else {}
    if models:
        if weights and len(weights) != len(models):
            raise ConfigError(f"{len(weights)} --weight for {len(models)} --model; give one weight per model, or "
                              f"none")
        values["models"] = [{"model": m, "weight": w} for m, w in zip(models, weights or [1.0] * len(models))]
    elif weights:
        raise ConfigError("--weight without --model; give the models")
    if slices:
        values["slices"] = [_slice(s) for s in slices]
    for key, value in (("base", base), ("method", method), ("seed", seed)):
        if value is not None:
            values[key] = value
    if dequantize:
        values["dequantize"] = True
    values.setdefault("method", "passthrough" if values.get("slices") else "task_arithmetic")
    parameters = dict(values.get("parameters", {}))
    parameters.update(dict(_param(p) for p in params))
    for key, value in (("density", density), ("lambda", lambda_), ("t", t)):
        if value is not None:
            parameters[key] = value
    values["parameters"] = parameters
    cfg = MergeConfig.from_dict(values, "merge flags")
    with progress_view(quiet=as_json) as listen:
        result = run_merge(cfg, out, force=force, progress=listen)
    emit(result, as_json, lambda: console.print(
        f"{result['method']}: {len(result['inputs'])} inputs -> {result['out']} ({result['tensors']} tensors, "
        f"{result['n_layer']} blocks); rerun with `lbdl merge --config {result['out']}/merge.json --out DIR`"))


@app.command("search")
@config_options(SearchConfig)
def search(
    base: str = typer.Option(..., "--base", metavar="DIR", help="The model the others were fine-tuned from."),
    models: list[str] = typer.Option([], "--model", metavar="MODEL", help="A model directory to merge, or a LoRA "
                                     "adapter directory over --base (repeat for each). [default: none]"),
    evals: list[str] = typer.Option([], "--eval", metavar="FILE", help="A JSONL task file of {prompt, completion "
                                    "or answer} records that scores each candidate (repeat: the objective is the "
                                    "mean). [default: none]"),
    out: str = out_option("Output directory: the best merge (its merge.json reruns it), search.json, trials.md."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Search merge weights or layer recombinations with CMA-ES, scoring each candidate on task files, and write
    the best merge (Akiba et al. 2024)."""
    from ..merge.search import search as run_search

    cfg = build(SearchConfig, fields)
    with progress_view(quiet=as_json) as listen:
        result = run_search(base, models, evals, cfg, out=out, force=force, progress=listen)
    emit(result, as_json, lambda: console.print(
        f"{result['space']} search, {result['method']}: {result['trials']} trials, best trial "
        f"{result['best_trial']} with {result['metric']} {result['best_objective']:.4f} (the first had "
        f"{result['initial_objective']:.4f}) -> {result['out']}; see {result['out']}/trials.md, rerun the merge with "
        f"`lbdl merge --config {result['out']}/merge.json --out DIR`"))


def _render_methods(rows: list[dict]) -> None:
    for row in rows:
        needs = " (needs --base)" if row["needs_base"] else ""
        console.print(f"{row['name']}{needs}: {row['paper']}")
        for p in row["params"]:
            console.print(f"    {p['name']} = {p['default']!r}: {p['help']}")


merge.config_classes = (MergeFlags,)  # the numbers' ranges, for the house-style test
