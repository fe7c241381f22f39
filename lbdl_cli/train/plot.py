"""Loss curves: a PNG through matplotlib (optional extra) or a chart drawn in text."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..atomic import atomic_file
from ..errors import ConfigError, DataError
from .state import METRICS, read_metrics


def load_curves(run: str | Path) -> dict:
    """{"train": [(step, loss)...], "val": [(step, val_loss)...]} of a run's metrics.jsonl; errors name the file
    and line."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise DataError(f"{run} has no {METRICS}; give a run directory written by `lbdl train`")
    train, val = [], []
    for number, record in read_metrics(path):
        for key, points in (("loss", train), ("val_loss", val)):
            if key in record:
                value = record[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise DataError(f"metrics file {path}:{number}: expected a number for {key!r}, got {value!r}; "
                                    f"fix or remove the line")
                points.append((record["step"], value))
    if not train and not val:
        raise DataError(f"{path} holds no logged steps yet")
    return {"train": train, "val": val}


def text_chart(series: dict[str, list[tuple[float, float]]], width: int = 64, height: int = 16,
               log_x: bool = False, x_label: str = "step") -> str:
    """Several (x, y) series on one character grid, each drawn with its own mark."""
    marks = "*o+x#"
    points = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not points:
        return "(nothing to draw)"
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    grid = [[" "] * width for _ in range(height)]
    for mark, s in zip(marks, series.values()):
        for x, y in s:
            if not math.isfinite(y):
                continue
            col = round((fx(x) - x0) / (x1 - x0) * (width - 1))
            row = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
            grid[row][col] = mark
    lines = [f"{y1:8.3f} |" + "".join(grid[0])]
    lines += ["         |" + "".join(r) for r in grid[1:-1]]
    lines += [f"{y0:8.3f} |" + "".join(grid[-1]), "         +" + "-" * width]
    left = f"{10 ** x0:.0e}" if log_x else f"{x0:g}"
    right = f"{10 ** x1:.0e}" if log_x else f"{x1:g}"
    lines.append("          " + left + " " * max(1, width - len(left) - len(right)) + right)
    legend = "   ".join(f"{m} {name}" for m, name in zip(marks, series))
    lines.append(f"          {x_label}: {legend}")
    return "\n".join(lines)


def terminal_chart(curves: dict) -> str:
    return text_chart({"train loss": curves["train"], "val loss": curves["val"]})


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--png needs matplotlib: pip install 'lbdl[plot]' (or leave out --png for a terminal "
                          "chart)") from None
    return plt


def save_png(fig, out: str | os.PathLike, inputs=()) -> None:
    """Write a matplotlib figure to the PNG `out` atomically (never over one of `inputs`)."""
    with atomic_file(out, force=True, inputs=inputs) as tmp:
        fig.savefig(tmp, format="png")


def plot_png(curves: dict, out: str, inputs=()) -> None:
    """The loss curves as a PNG; `inputs` (the metrics file) are never written over."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in (("train", curves["train"]), ("validation", curves["val"])):
        if points:
            ax.plot(*zip(*points), label=name, marker="o" if name == "validation" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        save_png(fig, out, inputs)
    finally:
        plt.close(fig)
