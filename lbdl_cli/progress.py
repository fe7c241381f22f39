"""The one progress protocol: library code reports `Event`s, the CLI renders them.

A long-running library function takes `progress: Progress | None` and reports
through `report(progress, ...)`, which does nothing when no one listens:

    def quantize_dir(..., progress: Progress | None = None):
        for i, name in enumerate(names):
            ...
            report(progress, "quantizing", i + 1, len(names), unit="tensors", status=name)
        report(progress, "quantizing", message="kept tok_emb.weight in full precision", level="warning")

`done` is absolute (units of the stage finished so far), never an increment,
so a listener that joins late or misses an event still shows the truth.
Library code never prints: the CLI's renderer (`cli.output.progress_view`)
draws one bar per stage on a terminal and prints messages above it;
warnings are printed in a pipe too. Torch-free, layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Event:
    """One report of a long-running step."""

    stage: str  # what is being done: "tokenizing", "quantizing", "train", "sweep", ...
    done: float = 0  # units of the stage finished so far (absolute)
    total: float | None = None  # units in the stage; None when unknown
    unit: str = ""  # what a unit is: "tokens", "bytes", "windows", "tensors", "steps", "variants"
    status: str = ""  # a short text shown beside the bar ("loss 3.21, lr 1.0e-03")
    message: str = ""  # a line to print above the bar (an evaluation, a note); "" for none
    level: str = "info"  # "info" | "warning": how a message is shown
    data: dict = field(default_factory=dict)  # the structured record behind the event (a training step's numbers)


Progress = Callable[[Event], None]


def report(progress: Progress | None, stage: str, done: float = 0, total: float | None = None, **fields) -> None:
    """Send one Event to `progress`, if there is a listener."""
    if progress is not None:
        progress(Event(stage, done, total, **fields))


def collect(events: list[Event]) -> Progress:
    """A listener that keeps every event in `events` (tests, scripts)."""
    return events.append
