"""Run directories and resumable checkpoints, written so that a kill at any
moment leaves a loadable `last/`.

RUN/
  train_config.json       the resolved TrainConfig
  metrics.jsonl           one JSON object per logged step / evaluation
  ckpt/step-0000400/      complete model directories (+ optimizer and trainer state)
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
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_dir, write_json, write_model
from ..errors import CheckpointError

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"


def is_run(path: Path) -> bool:
    return (path / TRAIN_CONFIG).is_file()


def step_dir(run: Path, step: int) -> Path:
    return run / "ckpt" / f"step-{step:07d}"


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


def save_checkpoint(run: Path, step: int, config, model_state: dict, optim_state: dict, trainer: dict, rng: dict,
                    tokenizer: Path | None, sections: dict, best: bool) -> Path:
    """Write ckpt/step-N (model + optimizer + trainer state) and point `last` (and `best`) at it.

    `optim_state` is a full optimizer state dict keyed by parameter name (as
    torch.distributed.checkpoint.state_dict gives it, also without DDP/FSDP).
    """
    target = step_dir(run, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, force=True) as tmp:
        write_model(tmp, config, model_state, tokenizer, sections)
        tensors = {f"rng.{k}": v for k, v in rng.items()}
        for name, values in optim_state["state"].items():
            for key, value in values.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{name}.{key}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
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
