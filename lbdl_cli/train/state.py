"""Run directories and resumable checkpoints, written so that a kill at any
moment leaves a loadable `last/`.

RUN/
  train_config.json       the resolved TrainConfig
  metrics.jsonl           one JSON object per logged step / evaluation
  ckpt/step-0000400/      the trainable state (ModelDirectories: a complete model directory) + optimizer and
                          trainer state
  last -> ckpt/step-...   relative symlinks, swapped atomically
  best -> ckpt/step-...

A checkpoint directory is written under a temporary name and renamed; the
symlink is then replaced with os.replace. Optimizer and RNG state are stored
in safetensors and JSON: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..atomic import atomic_dir
from ..checkpoint import load_model, save_tensors, write_json, write_model
from ..errors import CheckpointError, ConfigError
from . import distributed

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"


def is_run(path: Path) -> bool:
    return (path / TRAIN_CONFIG).is_file()


def step_dir(run: Path, step: int) -> Path:
    return run / "ckpt" / f"step-{step:07d}"


def check_run_dir(run: Path, resume: bool, force: bool) -> bool:
    """Refuse a run directory that cannot be used; True when it holds something that --force replaces."""
    if resume:
        if not (run / "last").exists():
            raise ConfigError(f"{run} has no last/ checkpoint to resume from")
        return False
    if run.exists() and any(run.iterdir()):
        if not force:
            what = "another run" if is_run(run) else "files"
            raise ConfigError(f"{run} already holds {what}; pass --resume {run} to continue it or --force to start "
                              f"over")
        return True
    return False


def last_step(run: Path) -> int:
    """The step of the run's last checkpoint."""
    return json.loads(((run / "last").resolve() / TRAINER_FILE).read_text())["step"]


def _point(run: Path, name: str, target: Path) -> None:
    link, tmp = run / name, run / f".{name}.link-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run), tmp)
    if link.exists() and not link.is_symlink():
        raise CheckpointError(f"{link} is a real directory, not a checkpoint link; move it away and retry")
    os.replace(tmp, link)


def _prune(run: Path) -> None:
    keep = {(run / name).resolve() for name in ("last", "best") if (run / name).exists()}
    for d in (run / "ckpt").iterdir():
        if d.resolve() not in keep:
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(run: Path, step: int, write_state: Callable[[Path], None], optim_state: dict, trainer: dict,
                    rng: dict, best: bool) -> Path:
    """Write ckpt/step-N (`write_state(dir)` writes the trainable state; then the optimizer and trainer state)
    and point `last` (and `best`) at it.

    `optim_state` is a full optimizer state dict keyed by parameter name (as
    torch.distributed.checkpoint.state_dict gives it, also without DDP/FSDP).
    """
    target = step_dir(run, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, force=True) as tmp:
        write_state(tmp)
        tensors = {f"rng.{k}": v for k, v in rng.items()}
        for name, values in optim_state["state"].items():
            for key, value in values.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{name}.{key}"] = t.detach().cpu().contiguous()
        save_tensors(tensors, tmp / OPTIMIZER_FILE)
        write_json(tmp / TRAINER_FILE, {**trainer, "step": step, "param_groups": optim_state["param_groups"]})
    _point(run, "last", target)
    if best:
        _point(run, "best", target)
    _prune(run)
    return target


def load_trainer_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(trainer state, full optimizer state dict, rng tensors) of a checkpoint."""
    path = ckpt / OPTIMIZER_FILE
    if not path.is_file() or not (ckpt / TRAINER_FILE).is_file():
        raise CheckpointError(f"{ckpt} has no optimizer/trainer state; it cannot be resumed (start a new run)")
    trainer = json.loads((ckpt / TRAINER_FILE).read_text())
    state, rng = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            kind, rest = key.split(".", 1)
            if kind == "rng":
                rng[rest] = f.get_tensor(key)
            else:
                name, field = rest.rsplit(".", 1)
                state.setdefault(name, {})[field] = f.get_tensor(key)
    return trainer, {"state": state, "param_groups": trainer.pop("param_groups")}, rng


def truncate_metrics(run: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they will be logged again after a resume)."""
    path = run / METRICS
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def append_metrics(run: Path, record: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class ModelDirectories:
    """Pretraining's and full fine-tuning's checkpoints: each a complete model directory (config.json with the
    tokenizer's and the training's sections, model.safetensors, tokenizer.model) plus optimizer and trainer state."""

    tokenizer: Path  # the tokenizer.model copied into each checkpoint
    sections: dict  # config.json sections besides the model's (the tokenizer's)
    data: str  # the training data, recorded in config.json's training section

    def save(self, run: Path, step: int, model, optimizer, trainer: dict, rng: dict, training: dict, best: bool,
             write: bool) -> None:
        model_state, optim_state = distributed.full_state(model, optimizer)
        if write:
            sections = {**self.sections, "training": {**training, "data": self.data}}
            save_checkpoint(run, step, lambda d: write_model(d, model.config, model_state, self.tokenizer, sections),
                            optim_state, trainer, rng, best)

    def load(self, run: Path, model, optimizer) -> tuple[dict, dict]:
        last = (run / "last").resolve()
        loaded, _ = load_model(last, dtype=torch.float32)
        trainer, optim_state, rng = load_trainer_state(last)
        distributed.load_full_state(model, optimizer, loaded.state_dict(), optim_state)
        return trainer, rng
