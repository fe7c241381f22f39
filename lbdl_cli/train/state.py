"""Run directories and resumable checkpoints, written so that a run killed at any
moment can be resumed: from `last/`, or from step 0 when it had none yet.

RUN/
  train_config.json       the resolved TrainConfig, written (atomically) as the run starts: it makes RUN a run
  metrics.jsonl           one JSON object per logged step / evaluation
  ckpt/step-0000400/      the trainable state (ModelDirectories: a complete model directory) + optimizer and
                          trainer state
  last -> ckpt/step-...   relative symlinks, swapped atomically
  best -> ckpt/step-...

A checkpoint directory is written under a temporary name and renamed
(atomic.atomic_dir); the symlink is made under a temporary name and put in
place with os.replace. The temporary names are `.NAME.tmp-PID` (and
`.NAME.old-PID`, a directory being replaced): those of dead processes are
removed as a run starts and at each write. Optimizer and RNG state are stored
in safetensors and JSON: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_dir, atomic_file, check_not_input, check_writable, remove_stale
from ..checkpoint import load_model, save_tensors, write_json, write_model
from ..errors import CheckpointError, ConfigError, DataError, OutputExistsError
from ..files import read_json, read_jsonl, read_text
from . import distributed

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"
TRAINER_KEYS = ("step", "best_val", "best_step", "bad_evals", "tokens_seen", "param_groups")
TEMPORARY = re.compile(r"\.(.+)\.(?:tmp|old)-\d+")  # atomic.py's temporary siblings: .NAME.tmp-PID, .NAME.old-PID


def is_run(path: Path) -> bool:
    return (path / TRAIN_CONFIG).is_file()


def step_dir(run: Path, step: int) -> Path:
    return run / "ckpt" / f"step-{step:07d}"


def check_run_dir(run: Path, resume: bool, force: bool, inputs=()) -> bool:
    """Refuse, before any work, a run directory that cannot be used; True when it holds something that --force
    replaces.

    --resume needs a run (a directory with train_config.json, written as a run starts): it continues from
    last/, or from step 0 when the run stopped before its first checkpoint. A new run needs a directory that
    is absent, empty or (with --force) replaceable, is not one of its `inputs` (the data, the model it starts
    from) nor inside or around one, and can be written."""
    if resume:
        if not is_run(run):
            raise ConfigError(f"{run} is not a run directory (no {TRAIN_CONFIG}); nothing to resume")
        return False
    check_not_input(run, inputs)
    if os.path.lexists(run) and not run.is_dir():
        raise OutputExistsError(f"--out {run} is a file, not a directory; choose another path")
    if not run.is_dir():
        check_writable(run)  # where it will be made
        return False
    check_writable(run / TRAIN_CONFIG, "file")  # what it will hold
    if any(run.iterdir()):
        if not force:
            if is_run(run):
                raise ConfigError(f"{run} already holds another run; pass --resume {run} to continue it or --force "
                                  f"to start over")
            raise ConfigError(f"{run} already holds other files (not a run); pass --force to replace them or choose "
                              f"another --out")
        if run.is_symlink():
            raise OutputExistsError(f"--out {run} is a symbolic link; give the directory it points to, or remove it")
        check_writable(run)  # clear_run renames it aside
        return True
    return False


def clear_run(run: Path) -> None:
    """Replace a run directory by an empty one (--force): moved aside, then deleted, so that a kill leaves the
    old directory whole or an empty one (and a stale `.RUN.old-PID`, removed by the next start)."""
    old = run.parent / f".{run.name}.old-{os.getpid()}"
    run.rename(old)
    run.mkdir()
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(run: Path) -> None:
    """Remove the temporary directories, files and links that killed processes left in the run, in its ckpt/ and
    beside it (a `.RUN.old-PID` of clear_run)."""
    remove_stale(run)
    for folder in (run, run / "ckpt"):
        if folder.is_dir():
            for name in {m.group(1) for p in folder.iterdir() if (m := TEMPORARY.fullmatch(p.name))}:
                remove_stale(folder / name)


def write_config(run: Path, config: dict) -> None:
    with atomic_file(run / TRAIN_CONFIG, force=True) as tmp:
        write_json(tmp, config)


def last_checkpoint(run: Path) -> Path | None:
    """The checkpoint that `last` points to; None when the run has none yet.

    A kill between atomic_dir's two renames, while a checkpoint was written again over itself, leaves `last`
    pointing at nothing and the checkpoint under `.NAME.old-PID`: it is put back."""
    link = run / "last"
    if not os.path.lexists(link):
        return None
    target = link.resolve()
    if not target.is_dir():
        old = sorted(target.parent.glob(f".{target.name}.old-*"))
        if not old:
            raise CheckpointError(f"{link} points to {target}, which is missing; restore it, or start over with "
                                  f"--force")
        old[0].rename(target)
    return target


def last_step(run: Path) -> int:
    """The step of the run's last checkpoint."""
    return read_trainer_state(run / "last")["step"]


def _point(run: Path, name: str, target: Path) -> None:
    """Point the link `name` at `target`: a new link under `.NAME.tmp-PID`, put in place with os.replace."""
    link, tmp = run / name, run / f".{name}.tmp-{os.getpid()}"
    if link.exists() and not link.is_symlink():
        raise CheckpointError(f"{link} is a real directory, not a checkpoint link; move it away and retry")
    remove_stale(link)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(os.path.relpath(target, run), tmp)
    os.replace(tmp, link)


def _prune(run: Path) -> None:
    """Delete the checkpoints that neither `last` nor `best` points to (temporary ones are remove_stale's)."""
    keep = {(run / name).resolve() for name in ("last", "best") if (run / name).exists()}
    for d in (run / "ckpt").glob("step-*"):
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


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json: the loop's bookkeeping, the optimizer's param_groups."""
    path = ckpt / TRAINER_FILE
    trainer = read_json(path, "trainer state", error=CheckpointError)
    missing = [key for key in TRAINER_KEYS if key not in trainer]
    if missing or not isinstance(trainer["step"], int):
        raise CheckpointError(f"trainer state {path} lacks " + (", ".join(missing) if missing else "an integer step")
                              + "; it cannot be resumed (start over with --force)")
    return trainer


def load_trainer_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(trainer state, full optimizer state dict, rng tensors) of a checkpoint."""
    path = ckpt / OPTIMIZER_FILE
    if not path.is_file() or not (ckpt / TRAINER_FILE).is_file():
        raise CheckpointError(f"{ckpt} has no optimizer/trainer state; it cannot be resumed (start a new run)")
    trainer = read_trainer_state(ckpt)
    state, rng = {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                kind, rest = key.split(".", 1)
                if kind == "rng":
                    rng[rest] = f.get_tensor(key)
                else:
                    name, field = rest.rsplit(".", 1)
                    state.setdefault(name, {})[field] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable optimizer state ({e}); it cannot be resumed "
                              f"(start over with --force)") from None
    return trainer, {"state": state, "param_groups": trainer.pop("param_groups")}, rng


def read_metrics(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of each line of a metrics.jsonl; errors name the file and line.

    A last line without its newline is left out: a write cut short by a kill (always after the last checkpoint),
    or one being written now (`lbdl plot` of a running run)."""
    text = read_text(path, "metrics file")
    lines = text.split("\n")
    complete = len(lines) - 1  # the lines that end with a newline
    last_full = max((n for n, line in enumerate(lines[:complete], 1) if line.strip()), default=0)
    records, seen = [], 0
    try:
        for number, record in read_jsonl(path, "metrics file"):
            if number > complete:
                break
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise DataError(f"metrics file {path}:{number}: expected an integer \"step\", got {step!r}; "
                                f"fix or remove the line")
            records.append((number, record))
            seen = number
    except DataError:
        if seen < last_full:  # the error is on a complete line, not on the cut one
            raise
    return records


def truncate_metrics(run: Path, step: int) -> None:
    """Drop the metric lines logged after `step` (they will be logged again after a resume): all of them for a
    restart from step 0."""
    path = run / METRICS
    if not path.exists():
        return
    kept = [record for _, record in read_metrics(path) if record["step"] <= step]
    with atomic_file(path, force=True) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))


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
