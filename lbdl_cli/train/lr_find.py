"""Learning-rate range test (the reference's training practice): train a
fresh copy of the model for a few steps at each learning rate of 1e-5..1 in
half-decades, and suggest the largest that does not diverge."""

from __future__ import annotations

import math

from ..errors import ConfigError
from ..progress import Progress, report
from . import distributed
from .config import LR_FIND_STEPS, TrainConfig
from .loop import Trainer
from .plot import pyplot, save_png, text_chart
from .pretrain import pretraining_parts

GRID = [10 ** (-5 + k / 2) for k in range(11)]  # 1e-5, 3.2e-5, ..., 1


def lr_find(cfg: TrainConfig, steps: int = LR_FIND_STEPS, lrs: list[float] | None = None,
            progress: Progress | None = None) -> dict:
    """Loss after `steps` constant-lr steps from the same initialisation, for each lr (the mean of the last
    fifth of the steps' losses); reported under the stage "lr-find", one unit an lr.

    An lr diverged when its loss is not finite or ends above the initial loss.
    Stops after the second diverged lr in a row (larger ones only get worse).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"lr-find: steps must be a whole number >= 1, got {steps!r}")
    lrs = lrs or GRID
    if not all(isinstance(lr, (int, float)) and 0 < lr < math.inf for lr in lrs):
        raise ConfigError(f"lr-find: every learning rate must be a positive number, got {lrs}")
    rows, initial, streak = [], None, 0
    with distributed.session(cfg.device) as dist:
        for i, lr in enumerate(lrs):
            run_cfg = cfg.replace(out=None, lr=lr, schedule="constant", warmup=0.0, max_steps=steps)
            trainer = Trainer(run_cfg, pretraining_parts(run_cfg, dist), dist)  # the same seed: the same model
            if initial is None:
                initial = trainer.first_loss()
            losses = []
            while trainer.step < steps and (not losses or math.isfinite(losses[-1])):
                losses.append(trainer.train_step()[0])
            tail = losses[-max(1, steps // 5):]
            loss = sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else math.nan
            diverged = not math.isfinite(loss) or loss > initial
            rows.append({"lr": lr, "loss": loss, "diverged": diverged})
            if dist.main:
                report(progress, "lr-find", i + 1, len(lrs), unit="lrs", status=f"lr {lr:.1e}: {loss:.3f}",
                       data=rows[-1])
            streak = streak + 1 if diverged else 0
            if streak == 2:
                break
    stable = [r["lr"] for r in rows if not r["diverged"]]
    suggested = max(stable) if stable else min(lrs)
    chart = text_chart({"loss": [(r["lr"], r["loss"]) for r in rows]}, log_x=True, x_label="lr")
    return {"rows": rows, "initial_loss": initial, "suggested_lr": suggested, "steps": steps, "chart": chart}


def plot_lr_find(result: dict, out: str) -> None:
    plt = pyplot()
    rows = [r for r in result["rows"] if math.isfinite(r["loss"])]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.semilogx([r["lr"] for r in rows], [r["loss"] for r in rows], marker="o")
    ax.axhline(result["initial_loss"], color="gray", linestyle="--", label="initial loss")
    ax.axvline(result["suggested_lr"], color="green", linestyle=":", label=f"suggested {result['suggested_lr']:.1e}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"loss after {result['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        save_png(fig, out)
    finally:
        plt.close(fig)
