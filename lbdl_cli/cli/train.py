"""`lbdl train`, `lbdl lr-find`, `lbdl plot`: training runs and their curves.

Every TrainConfig field is a flag (`max_steps` -> `--max-steps`), generated
from the dataclass (cli/options.py) so that a default and its help live in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..atomic import check_out
from ..lora.config import LoRAConfig
from ..records import RecordsConfig
from ..train.config import FinetuneConfig, LrFindConfig, TrainConfig
from .options import build, config_options, given, model_argument, optional, png_option
from .output import JSON_OPTION, console, emit, progress_view

CONFIG_OPTION = typer.Option(None, "--config", metavar="FILE",
                             help=optional("TOML file with any training field; flags override it."))
LR_FIND_SKIP = ("out", "lr", "max_steps", "log_interval", "peak_tflops",  # lr-find sets or needs none of these
                "max_tokens", "epochs", "init_from", "fsdp", "patience", "eval_interval", "eval_batches",
                "overfit_batch", "schedule", "warmup", "decay", "step_every", "step_gamma", "min_lr")


def register(app: typer.Typer) -> None:
    app.command("train")(config_options(TrainConfig)(train))
    app.command("lr-find")(config_options(LrFindConfig)(config_options(TrainConfig, skip=LR_FIND_SKIP)(lr_find)))
    app.command("plot")(plot)
    app.command("finetune")(config_options(RecordsConfig, skip=("seed",))(config_options(LoRAConfig)(
        config_options(FinetuneConfig, skip=FINETUNE_SKIP)(finetune))))


RESUME_OPTION = typer.Option(None, "--resume", metavar="RUN",
                             help=optional("Continue the run in this directory from its last/ checkpoint (or from "
                                           "the start when it was stopped before its first)."))
FORCE_RUN_OPTION = typer.Option(False, "--force", help="Start over in an output directory that holds another run or "
                                                       "other files.")


def train(
    config: Optional[str] = CONFIG_OPTION,
    resume: Optional[str] = RESUME_OPTION,
    force: bool = FORCE_RUN_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Pretrain a model from a preset, or fine-tune all weights of a model (--init-from)."""
    from ..train import resolve
    from ..train.loop import resume_config
    from ..train.loop import train as run_training

    fields = given(TrainConfig, fields)
    cfg = resume_config(resume, fields) if resume else resolve(config, fields)
    with progress_view(quiet=as_json) as listen:
        result = run_training(cfg, listen, resume=bool(resume), force=force)
    emit(result, as_json, lambda: _render_run(result))


def _render_run(result: dict) -> None:
    """The summary of a training or fine-tuning run."""
    baseline = "" if result["unigram_loss"] is None else f"unigram baseline {result['unigram_loss']:.4f}, "
    initial = "unknown" if result["initial_loss"] is None else f"{result['initial_loss']:.4f}"
    resumed = "" if result.get("resume_loss") is None else f", {result['resume_loss']:.4f} at the resume"
    console.print(f"{result['steps']} steps ({result['stop_reason']}), {result['tokens']:,} tokens; "
                  f"best val loss {result['best_val_loss']:.4f} at step {result['best_step']} "
                  f"({baseline}initial {initial}{resumed})")
    what = "adapters" if result.get("method") in ("lora", "qlora") else "models"
    console.print(f"{what}: {result['run']}/best and {result['run']}/last")
    if "overfit_passed" in result:
        verdict = ("passed" if result["overfit_passed"]
                   else "FAILED: the loss did not approach 0 (a bug, or too few steps)")
        console.print(f"overfit check: one batch's loss {initial} -> "
                      f"{result['final_loss']:.4f}: {verdict}")


def lr_find(
    config: Optional[str] = CONFIG_OPTION,
    png: Optional[str] = png_option("Write the loss-vs-lr plot to this PNG file"),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Learning-rate range test: train briefly at each lr of 1e-5..1 (half-decades) and suggest one."""
    from ..train import resolve
    from ..train.lr_find import lr_find as run_lr_find
    from ..train.lr_find import plot_lr_find

    cfg = resolve(config, given(TrainConfig, fields))
    steps = build(LrFindConfig, fields).steps
    _png_first(png, inputs=(cfg.data, cfg.init_from))
    with progress_view(quiet=as_json) as listen:
        result = run_lr_find(cfg, steps=steps, progress=listen)
    if png:
        plot_lr_find(result, png)
        result["plot"] = png

    def render():
        from rich.table import Table

        table = Table("lr", "loss after", "")
        for row in result["rows"]:
            mark = "diverged" if row["diverged"] else ("suggested" if row["lr"] == result["suggested_lr"] else "")
            table.add_row(f"{row['lr']:.1e}", f"{row['loss']:.4f}", mark)
        console.print(table)
        if not png:
            console.print(result["chart"])
        console.print(f"initial loss {result['initial_loss']:.4f}; suggested lr {result['suggested_lr']:.1e} "
                      f"(the largest that did not diverge)")

    emit({k: v for k, v in result.items() if k != "chart"}, as_json, render)


FINETUNE_SKIP = ("preset", "init_from", "data")  # MODEL and DATA are its arguments; no preset


def finetune(
    model: Optional[str] = model_argument("The model to fine-tune (its tokenizer reads the records).",
                                          required=False),
    data: Optional[str] = typer.Argument(None, metavar="DATA", help="JSONL records: {prompt, completion}, {text} "
                                         "or {messages} (see --format)."),
    config: Optional[str] = CONFIG_OPTION,
    resume: Optional[str] = RESUME_OPTION,
    force: bool = FORCE_RUN_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Fine-tune a model on instruction records: LoRA adapters, QLoRA on a quantized base, or every weight."""
    from ..errors import ConfigError
    from ..train import resolve
    from ..train.finetune import finetune as run_finetune
    from ..train.loop import resume_config

    flags = {**given(FinetuneConfig, fields), "lora": given(LoRAConfig, fields),
             "records": given(RecordsConfig, fields)}
    flags = {k: v for k, v in flags.items() if v != {}}
    if resume:
        if model or data:
            raise ConfigError("--resume RUN continues a run with its own MODEL and DATA; give neither")
        cfg = resume_config(resume, flags, cls=FinetuneConfig)
    else:
        if not (model and data):
            raise ConfigError("give MODEL and DATA: lbdl finetune MODEL DATA --out RUN (or --resume RUN)")
        cfg = resolve(config, {**flags, "init_from": model, "data": data}, cls=FinetuneConfig)
    with progress_view(quiet=as_json) as listen:
        result = {**run_finetune(cfg, listen, resume=bool(resume), force=force), "method": cfg.method}
    emit(result, as_json, lambda: _render_run(result))


def _png_first(png: str | None, inputs) -> None:
    """Before any work: the PNG can be written (and is no input), and matplotlib is there to draw it."""
    if png:
        from ..train.plot import pyplot

        check_out(png, force=True, inputs=inputs, kind="file")
        pyplot()


def plot(
    run: str = typer.Argument(..., metavar="RUN", help="Run directory (with metrics.jsonl)."),
    png: Optional[str] = png_option("Write the curves to this PNG file instead of drawing them in the terminal"),
    as_json: bool = JSON_OPTION,
):
    """Draw the training and validation loss curves of a run."""
    from ..train.plot import load_curves, plot_png, terminal_chart

    metrics = Path(run) / "metrics.jsonl"
    _png_first(png, inputs=(metrics,))
    curves = load_curves(run)
    if png:
        plot_png(curves, png, inputs=(metrics,))
    emit({"run": run, "png": png, **curves}, as_json,
         lambda: console.print(f"wrote {png}") if png else console.print(terminal_chart(curves)))
