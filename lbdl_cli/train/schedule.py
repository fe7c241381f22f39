"""Learning-rate schedules: linear warmup from lr/20, then cosine to a floor,
constant, or step decay (LBDL ch. 3; the reference's training practice)."""

from __future__ import annotations

import math

from .config import TrainConfig


def steps_of(value: float, total: int) -> int:
    """A length given in steps (>= 1) or as a fraction of the run (< 1)."""
    return int(value) if value >= 1 else int(round(value * total))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps`."""
    lr, floor = cfg.base_lr, cfg.floor_lr
    warmup = steps_of(cfg.warmup, total_steps)
    if step < warmup:  # linear from lr/20 to lr
        start = lr / 20
        return start + (lr - start) * step / warmup
    if cfg.schedule == "constant":
        return lr
    since = step - warmup
    if cfg.schedule == "step":
        every = max(1, steps_of(cfg.step_every, total_steps))
        return max(floor, lr * cfg.step_gamma ** (since // every))
    rest = total_steps - warmup
    decay = max(1, round(cfg.decay * rest) if cfg.decay <= 1 else int(cfg.decay))
    if since >= decay:
        return floor
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * since / decay))
