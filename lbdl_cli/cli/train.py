"""`lbdl train`, `lbdl lr-find`, `lbdl plot`: training runs and their curves.

Every TrainConfig field is a flag (`max_steps` -> `--max-steps`), generated
from the dataclass so that a default and its help live in one place.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from typing import Optional

import typer

from ..train.config import TrainConfig
from .output import JSON_OPTION, console, emit, err_console, human_count

CLI_ONLY = ("config", "resume", "force", "as_json")


def register(app: typer.Typer) -> None:
    app.command("train")(_with_train_flags(train))
    app.command("lr-find")(_with_train_flags(lr_find, skip=("out", "max_tokens", "epochs", "init_from", "fsdp",
                                                            "patience", "eval_interval", "eval_batches",
                                                            "overfit_batch", "schedule", "warmup", "decay",
                                                            "step_every", "step_gamma", "min_lr")))
    app.command("plot")(plot)


def _with_train_flags(func, skip: tuple = ()):
    """Give `func(**kwargs)` one optional flag per TrainConfig field (None = not given)."""
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params, annotations = list(own), {p.name: p.annotation for p in own}
    for f in fields(TrainConfig):
        if f.name in skip or f.name in annotations:
            continue
        default = f.default if f.default is not MISSING else None
        kind = {"int": int, "float": float, "str": str, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{f.name.replace('_', '-')}" if kind is bool else flag
        help_text = f.metadata.get("help", "") + (f" [default: {default!r}]" if kind is not bool and default not in ("", None) else "")
        option = typer.Option(None, decl, help=help_text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
        annotations[f.name] = Optional[kind]

    def command(**kwargs):
        return func(**kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = annotations
    command.__doc__ = func.__doc__
    command.__name__ = func.__name__
    return command


def _train_flags(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in CLI_ONLY}


class TrainView:
    """Renders training events: a progress bar and eval lines on a terminal, nothing in a pipe."""

    def __init__(self, quiet: bool):
        self.quiet = quiet or not err_console.is_terminal
        self.bar = self.task = None
        self.status = {}

    def __call__(self, kind: str, **data):
        if kind == "warn":
            err_console.print(f"[yellow]warning:[/yellow] {data['message']}")
        if self.quiet:
            return
        getattr(self, f"on_{kind}", lambda **d: None)(**data)

    def on_start(self, **d):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        err_console.print(
            f"{human_count(d['params'])} parameters, {d['tokens_per_step']:,} tokens/step, context {d['context']}, "
            f"{d['device']} {d['dtype']}, {d['world']} process(es); peak {d['peak_tflops']:.2f} TFLOP/s per process")
        err_console.print(
            f"initial loss {d['initial_loss']:.3f} (ln V = {d['ln_vocab']:.3f}); unigram baseline val loss {d['unigram_loss']:.3f}")
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=err_console)
        self.bar.start()
        self.task = self.bar.add_task("train", total=d["total_steps"], completed=d["start_step"], status="")

    def _refresh(self, step):
        s = self.status
        text = " ".join(f"{k} {v}" for k, v in s.items())
        self.bar.update(self.task, completed=step, status=text)

    def on_tick(self, step, loss, lr):
        self.status["loss"] = f"{loss:.3f}"
        self._refresh(step)

    def on_step(self, step, loss, lr, grad_norm, tokens, tokens_per_s, mfu):
        self.status.update(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **{"tok/s": f"{tokens_per_s:,.0f}", "MFU": f"{100 * mfu:.1f}%"})
        self._refresh(step)

    def on_eval(self, step, val_loss, best_val_loss, improved):
        self.status["val"] = f"{val_loss:.3f}"
        self._refresh(step)
        self.bar.console.print(f"step {step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))

    def on_done(self, **d):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def train(
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with any training field; flags override it."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory from its last/ checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an output directory that holds another run."),
    as_json: bool = JSON_OPTION,
    **kwargs,
):
    """Pretrain a model from a preset, or fine-tune all weights of a model (--init-from)."""
    from ..train import resolve
    from ..train.loop import resume_config, train as run_training

    flags = _train_flags(kwargs)
    if resume:
        cfg = resume_config(resume, flags)
    else:
        cfg = resolve(config, flags)
    view = TrainView(quiet=as_json)
    try:
        result = run_training(cfg, view, resume=bool(resume), force=force)
    finally:
        view.close()

    def render():
        console.print(f"{result['steps']} steps ({result['stop_reason']}), {result['tokens']:,} tokens; "
                      f"best val loss {result['best_val_loss']:.4f} at step {result['best_step']} "
                      f"(unigram baseline {result['unigram_loss']:.4f}, initial {result['initial_loss']:.4f})")
        console.print(f"models: {result['run']}/best and {result['run']}/last")
        if "overfit_passed" in result:
            verdict = "passed" if result["overfit_passed"] else "FAILED: the loss did not approach 0 (a bug, or too few steps)"
            console.print(f"overfit check: one batch's loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}: {verdict}")

    emit(result, as_json, render)


def lr_find(
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with any training field; flags override it."),
    steps: int = typer.Option(20, "--steps", help="Optimizer steps per learning rate."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the loss-vs-lr plot to this PNG (needs matplotlib)."),
    as_json: bool = JSON_OPTION,
    **kwargs,
):
    """Learning-rate range test: train briefly at each lr of 1e-5..1 (half-decades) and suggest one."""
    from ..train import resolve
    from ..train.lr_find import lr_find as run_lr_find, plot_lr_find
    from .output import progress

    cfg = resolve(config, _train_flags(kwargs))
    with progress("lr-find", total=None, quiet=as_json) as update:
        result = run_lr_find(cfg, steps=steps, on_lr=lambda lr, loss, total: update(total=total, status=f"lr {lr:.1e}: {loss:.3f}"))
    if out:
        plot_lr_find(result, out)
        result["plot"] = out

    def render():
        from rich.table import Table

        table = Table("lr", "loss after", "")
        for row in result["rows"]:
            mark = "diverged" if row["diverged"] else ("suggested" if row["lr"] == result["suggested_lr"] else "")
            table.add_row(f"{row['lr']:.1e}", f"{row['loss']:.4f}", mark)
        console.print(table)
        if not out:
            console.print(result["chart"])
        console.print(f"initial loss {result['initial_loss']:.4f}; suggested lr {result['suggested_lr']:.1e} "
                      f"(the largest that did not diverge)")

    emit({k: v for k, v in result.items() if k != "chart"}, as_json, render)


def plot(
    run: str = typer.Argument(..., help="Run directory (with metrics.jsonl)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write a PNG (needs matplotlib); else draw in the terminal."),
    as_json: bool = JSON_OPTION,
):
    """Draw the training and validation loss curves of a run."""
    from ..train.plot import load_curves, plot_png, terminal_chart

    curves = load_curves(run)
    if out:
        plot_png(curves, out)
    emit({"run": run, "out": out, **curves}, as_json,
         lambda: console.print(f"wrote {out}") if out else console.print(terminal_chart(curves)))
