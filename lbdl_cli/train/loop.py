"""The training loop, shared by every kind of training: pretraining from a preset, full fine-tuning of a
model, and fine-tuning with adapters, each of which hands the loop its `Parts` (parts.py).

AdamW with weight decay on matrices only, warmup + cosine (or constant / step)
schedule, gradient clipping and accumulation, periodic evaluation with the
best checkpoint kept and early stopping, bf16 autocast with fp32 master
weights, optional torch.compile, DDP/FSDP under torchrun, exact resume, Ctrl-C.

Progress (rank 0 only) goes to `lbdl_cli.progress.report` under the stage "train", `done` the step:
the start's summary and each evaluation as a message (data: the start's numbers, the evaluation's
record), every step a status ("loss .. lr .. tok/s .. MFU ..") with, every log_interval steps, the
step's record (as in metrics.jsonl) as data; warnings with level "warning".
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, RunFailed
from ..files import read_json
from ..model import flops_per_token
from ..progress import Progress, report
from . import distributed, state
from .config import DEFAULT_EPOCHS, OVERFIT_STEPS, TrainConfig
from .distributed import Dist
from .parts import Parts
from .pretrain import pretraining_parts
from .schedule import lr_at


class Interrupted(RunFailed):
    """Ctrl-C: a checkpoint was written; the CLI exits 130."""

    exit_code = 130


# --- set-up helpers --------------------------------------------------------------


def autocast_dtype(name: str, device: str) -> torch.dtype | None:
    """bfloat16 autocast (fp32 master weights) or None for plain float32."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def measure_peak_tflops(device: str, dtype: torch.dtype | None, seconds: float = 0.5) -> float:
    """Dense matmul throughput of this machine in the training dtype (best of 3 bursts): the MFU denominator."""
    n = 4096 if device.startswith("cuda") else 2048
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (dropout) untouched
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32, generator=g)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while count < 2 or time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        sync()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e12)
    return best


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on biases, norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith(("tok_emb.weight", "pos_emb.weight"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def ctrl_c():
    """Yield a function that tells whether Ctrl-C was pressed in the block; a second press stops at once.
    Outside the main thread (tests) no handler is set and it stays False."""
    pressed = [False]

    def on_sigint(signum, frame):
        if pressed[0]:
            raise KeyboardInterrupt
        pressed[0] = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        yield lambda: False
        return
    try:
        yield lambda: pressed[0]
    finally:
        signal.signal(signal.SIGINT, previous)


# --- the loop ----------------------------------------------------------------------


class Trainer:
    """Trains `parts.model` on `parts.sampler`'s batches: fit() runs the phases start, train_step, log_step,
    validate, checkpoint and finish; lr-find drives first_loss and train_step itself."""

    def __init__(self, cfg: TrainConfig, parts: Parts, dist: Dist, progress: Progress | None = None,
                 resume: bool = False, force: bool = False):
        self.cfg, self.parts, self.dist, self.progress, self.resume = cfg, parts, dist, progress, resume
        self.device = dist.device
        self.amp = autocast_dtype(cfg.compute_dtype, self.device)
        self.run = Path(cfg.out) if cfg.out else None  # lr-find trains without a run directory
        self.replace_run = self.run is not None and state.check_run_dir(self.run, resume, force, inputs(cfg))
        self.model, self.sampler, self.val, self.context = parts.model, parts.sampler, parts.val, parts.context
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * dist.world
        if self.samples_per_step > parts.n_samples:
            raise ConfigError(
                f"a step of {cfg.batch_size} x {cfg.grad_accum} x {dist.world} sequences (batch x accum x ranks) "
                f"is more than the {parts.n_samples} {parts.samples}; "
                f"lower --batch-size, --grad-accum or --context, or use more data")
        self.tokens_per_step = self.samples_per_step * self.context
        self.total_steps = self._total_steps()
        self.model.to(self.device)
        self.model.set_checkpointing(cfg.checkpoint_every)
        self.net = distributed.wrap(self.model, dist, cfg.fsdp)  # before the optimizer: FSDP swaps parameters
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.base_lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.step, self.tokens_seen, self.best_val, self.best_step, self.bad_evals = 0, 0, math.inf, None, 0
        self.last_val, self.rate, self.shown = None, None, None  # last: validation loss, (tokens/s, MFU), (loss, lr)
        self.val_metrics = {}  # an objective's other validation metrics (parts.Objective.metrics), the last ones
        # the loss at step 0 (from the checkpoint after a resume; None in one written before it was recorded),
        # and at the resumed step; restored: a checkpoint was loaded
        self.initial, self.resume_loss, self.restored = None, None, False
        self.rng_after = self._rng()

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.overfit_batch:
            return OVERFIT_STEPS
        if cfg.max_tokens is not None:
            return max(1, math.ceil(cfg.max_tokens / self.tokens_per_step))
        epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
        return max(1, math.ceil(epochs * self.parts.n_samples / self.samples_per_step))

    # --- the run, phase by phase -------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        self.start()
        stop_reason, loss = "max_steps", math.nan
        with ctrl_c() as pressed:
            while self.step < self.total_steps:
                # Ctrl-C on any rank: every rank checkpoints, then the run stops (exit 130)
                if self.dist.any(pressed()):
                    self.checkpoint(best=False)
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint written to {self.run / 'last'} "
                                      f"(continue with --resume {self.run})")
                # forward, backward and update: one optimizer step
                loss, grad_norm, lr = self.train_step()
                # a loss that is not finite stops the run: the last checkpoint is the last good one
                if not math.isfinite(loss):
                    raise self._diverged(loss)
                # metrics.jsonl and the progress listener
                self.log_step(loss, grad_norm, lr)
                # evaluate and checkpoint (last; best when improved); stop early when patience ran out
                if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                    self.checkpoint(best=self.validate())
                    if cfg.patience is not None and self.bad_evals >= cfg.patience:
                        stop_reason = "early_stopping"
                        break
        return self.finish(stop_reason, loss)

    def start(self) -> None:
        """Restore the last checkpoint (--resume) or begin a fresh run directory; write train_config.json (from
        then on the run can be resumed); measure the first loss; report the summary."""
        cfg, d = self.cfg, self.dist
        if self.run is None:
            raise ConfigError("give --out RUN, the run directory to write")
        if self.resume:
            self.restore()
        elif d.main and self.replace_run:
            state.clear_run(self.run)
        if d.main:  # on resume too: flags given then (a longer --max-steps, say) are part of the run now
            self.run.mkdir(parents=True, exist_ok=True)
            state.remove_stale_temps(self.run)
            state.write_config(self.run, cfg.to_dict())
        d.barrier()
        self.peak = cfg.peak_tflops if cfg.peak_tflops is not None else measure_peak_tflops(self.device, self.amp)
        self.flops = flops_per_token(self.model.config, self.context, training=True)
        self.baseline = self.parts.baseline() if self.parts.baseline else None
        if self.restored:
            self.resume_loss = self.first_loss()
        else:
            self.initial = self.first_loss()
        ln_v = math.log(self.model.config.vocab_size)
        info = dict(total_steps=self.total_steps, start_step=self.step, params=self.model.num_params(),
                    tokens_per_step=self.tokens_per_step, initial_loss=self.initial, ln_vocab=ln_v,
                    unigram_loss=self.baseline, peak_tflops=self.peak, world=d.world, device=self.device,
                    dtype="bfloat16" if self.amp else "float32", context=self.context)
        baseline = "" if self.baseline is None else f"; unigram baseline val loss {self.baseline:.3f}"
        initial = "unknown" if self.initial is None else f"{self.initial:.3f}"
        if self.restored:
            info["resume_loss"] = self.resume_loss
            losses = f"resumed at step {self.step}: loss {self.resume_loss:.3f} (initial {initial}, ln V = {ln_v:.3f})"
        else:
            losses = f"initial loss {initial} (ln V = {ln_v:.3f})"
        self._report(message=f"{info['params'] / 1e6:.2f}M parameters, {self.tokens_per_step:,} tokens/step, "
                             f"context {self.context}, {self.device} {info['dtype']}, {d.world} process(es); "
                             f"peak {self.peak:.2f} TFLOP/s per process\n{losses}{baseline}", data=info)
        if self.parts.fresh and not self.restored and abs(self.initial - ln_v) > 0.5:
            self._report(message=f"initial loss {self.initial:.3f} is more than 0.5 from ln(V) = {ln_v:.3f}: "
                                 f"check the initialisation and the data", level="warning")
        self._t_last, self._tokens_last = time.perf_counter(), self.tokens_seen

    def restore(self) -> None:
        """The trainable state, the optimizer, the bookkeeping and the RNG of the run's last checkpoint; or, when
        the run stopped before its first one, nothing: it starts again from step 0 (the same seed, the same model
        and batches) with its metrics emptied."""
        if self.dist.main:
            state.last_checkpoint(self.run)  # puts back a checkpoint that a kill left half-replaced
        self.dist.barrier()
        if state.last_checkpoint(self.run) is None:
            if self.dist.main:
                state.truncate_metrics(self.run, 0)
            return
        trainer, rng = self.parts.checkpoints.load(self.run, self.model, self.optimizer)
        self.restored = True
        self.initial = trainer.get("initial_loss")
        self.step = trainer["step"]
        self.best_val = trainer["best_val"] if trainer["best_val"] is not None else math.inf
        self.best_step, self.bad_evals = trainer["best_step"], trainer["bad_evals"]
        self.tokens_seen = trainer["tokens_seen"]
        self._set_rng(rng)
        if self.dist.main:
            state.truncate_metrics(self.run, self.step)

    @torch.no_grad()
    def first_loss(self) -> float:
        """The loss of the model as it stands on the run's first batch, without dropout."""
        x, y = self.sampler.batch(0, self.cfg.batch_size, self.device)
        self.net.eval()
        loss = self.dist.mean(self._loss(x, y).item())
        self.net.train()
        return loss

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step: set the lr, accumulate the gradients of grad_accum micro-batches (this rank's
        slice of each global batch), clip, update. (mean loss over ranks, gradient norm, lr).

        The loss is the mean over every scored target of the global batch (all micro-batches, all ranks): each
        micro-batch adds its sum scaled by world / (the global count of scored targets), which DDP's mean over
        ranks turns into that mean. Records mask their prompts, so micro-batches score different counts, and the
        mean of their means would weigh a target by the size of its micro-batch."""
        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = []
        for micro in range(cfg.grad_accum):
            if cfg.overfit_batch:
                start = d.rank * cfg.batch_size
            else:
                start = ((self.step * cfg.grad_accum + micro) * d.world + d.rank) * cfg.batch_size
            batches.append(self.sampler.batch(start, cfg.batch_size, self.device))
        if self.parts.objective is not None:  # another loss (contrastive): it runs the step's forward and backward
            total = self.parts.objective.backward(self.net, batches, d, lambda: autocast(self.device, self.amp))
            return self._update(lr, total)
        scored = d.sum(float(sum((y != -100).sum().item() for _, y in batches)))
        scale = d.world / max(scored, 1.0)
        total = 0.0
        for micro, (x, y) in enumerate(batches):
            sync = micro == cfg.grad_accum - 1 or not hasattr(self.net, "no_sync")
            with contextlib.nullcontext() if sync else self.net.no_sync():
                loss = self._loss(x, y, reduction="sum") * scale
                loss.backward()
            total += loss.item()
        return self._update(lr, total)

    def _update(self, lr: float, total: float) -> tuple[float, float, float]:
        """Clip and apply the accumulated gradients: (the step's loss, the mean over ranks of `total`; the
        gradient norm; lr)."""
        cfg, d = self.cfg, self.dist
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rng_after = self._rng()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return d.mean(total), grad_norm, lr

    def log_step(self, loss: float, grad_norm: float, lr: float) -> None:
        """Every log_interval steps (and the last): the step's record to metrics.jsonl and the listener;
        every step: the bar's status."""
        self.shown = (loss, lr)
        if self.step % self.cfg.log_interval == 0 or self.step == self.total_steps:
            now = time.perf_counter()
            tps = (self.tokens_seen - self._tokens_last) / max(now - self._t_last, 1e-9)
            self._t_last, self._tokens_last = now, self.tokens_seen
            self.rate = (tps, tps * self.flops / (self.peak * 1e12 * self.dist.world))
            record = dict(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens_seen,
                          tokens_per_s=tps, mfu=self.rate[1])
            self._log(record)
            self._report(data=record)
        else:
            self._report()

    def validate(self) -> bool:
        """Score the validation batches, keep the best-so-far bookkeeping, log and report the evaluation;
        True when it is the best so far."""
        val = self.evaluate()
        self.last_val = val
        improved = val < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
        else:
            self.bad_evals += 1
        record = dict(step=self.step, val_loss=val, best_val_loss=self.best_val, improved=improved,
                      **self.val_metrics)
        self._log(record)  # before the checkpoint: a resume from it must not lose this line
        others = "".join(f", {k} {v:.4f}" for k, v in self.val_metrics.items())
        self._report(message=f"step {self.step}: val loss {val:.4f}{others}" + (" (best)" if improved else ""),
                     data=record)
        return improved

    def checkpoint(self, best: bool) -> None:
        """Save the trainable state, the optimizer, the bookkeeping and the RNG after this step (a collective
        under FSDP: every rank gathers, rank 0 writes)."""
        trainer = {"best_val": self.best_val if math.isfinite(self.best_val) else None, "best_step": self.best_step,
                   "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen, "total_steps": self.total_steps,
                   "initial_loss": self.initial}
        self.parts.checkpoints.save(self.run, self.step, self.model, self.optimizer, trainer, self.rng_after,
                                    {"step": self.step, "val_loss": self.last_val}, best, write=self.dist.main)
        self.dist.barrier()

    def finish(self, stop_reason: str, loss: float) -> dict:
        """The run's result: initial_loss is the run's loss at step 0, resume_loss the loss where this process
        resumed it (None when it did not)."""
        result = dict(run=str(self.run), steps=self.step, stop_reason=stop_reason, best_val_loss=self.best_val,
                      best_step=self.best_step, last_val_loss=self.last_val, unigram_loss=self.baseline,
                      initial_loss=self.initial, resume_loss=self.resume_loss, final_loss=loss,
                      tokens=self.tokens_seen, params=self.model.num_params())
        if self.cfg.overfit_batch:  # the bug check: a sound model and loop drive one batch's loss towards 0
            start = self.initial if self.initial is not None else self.resume_loss
            result["overfit_passed"] = loss < 0.1 * start
        return result

    # --- pieces of the phases -------------------------------------------------------

    def _loss(self, x, y, reduction: str = "mean"):
        with autocast(self.device, self.amp):
            if self.parts.objective is not None:
                return self.parts.objective.loss(self.net, x, y)
            return self.net(x, targets=y, reduction=reduction)

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean loss per scored target over the validation batches (all ranks'); an objective's: per sample,
        with its other metrics (their means) in self.val_metrics."""
        self.net.eval()
        objective = self.parts.objective
        names = objective.metrics if objective is not None else ()
        total, count, sums = 0.0, 0.0, dict.fromkeys(names, 0.0)
        for x, y in self.val:
            if not len(x):
                continue
            x, y = x.to(self.device), y.to(self.device)
            if objective is not None:
                with autocast(self.device, self.amp):
                    loss_sum, n, metrics = objective.score(self.net, x, y)
                total, count = total + loss_sum, count + n
                for k in names:
                    sums[k] += metrics[k]
            else:
                rows = (y != -100).sum().item() / y.shape[1]  # scored targets, in rows: x's rows when none is masked
                total += self._loss(x, y).item() * rows
                count += rows
        self.net.train()
        total, count = self.dist.sum(total), self.dist.sum(count)
        self.val_metrics = {k: self.dist.sum(sums[k]) / count for k in names}
        return total / count

    def _diverged(self, loss: float) -> RunFailed:
        last = self.run / "last"
        where = f"{last} (step {state.last_step(self.run)})" if last.exists() else "none was written yet"
        return RunFailed(f"loss became {loss} at step {self.step}; stopped. Last good checkpoint: {where}. "
                         f"Lower --lr or check the data")

    def _status(self) -> str:
        """The bar's text: the last step's loss and lr, the last tokens/s and MFU, the last validation loss."""
        if self.shown is None:
            return ""
        status = f"loss {self.shown[0]:.3f} lr {self.shown[1]:.2e}"
        if self.rate:
            status += f" tok/s {self.rate[0]:,.0f} MFU {100 * self.rate[1]:.1f}%"
        return status + (f" val {self.last_val:.3f}" if self.last_val is not None else "")

    def _report(self, **fields) -> None:
        if self.dist.main and self.progress is not None:
            report(self.progress, "train", self.step, self.total_steps, unit="steps", status=self._status(), **fields)

    def _log(self, record: dict) -> None:
        if self.dist.main:
            state.append_metrics(self.run, record)

    def _rng(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def inputs(cfg: TrainConfig) -> tuple:
    """What a run reads, which its directory may not be, be inside or contain."""
    return cfg.data, cfg.init_from


def train(cfg: TrainConfig, progress: Progress | None = None, resume: bool = False, force: bool = False,
          parts: Callable[[TrainConfig, Dist], Parts] = pretraining_parts) -> dict:
    """Run a training job: `parts(cfg, dist)` builds what is trained (pretraining's by default). The distributed
    set-up is torn down however the job ends."""
    with distributed.session(cfg.device) as dist:
        if cfg.out:  # before the data and the model load: a bad --out fails at once (the Trainer checks it again)
            state.check_run_dir(Path(cfg.out), resume, force, inputs(cfg))
        return Trainer(cfg, parts(cfg, dist), dist, progress, resume=resume, force=force).fit()


def resume_config(run: str | Path, overrides: dict, cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The saved config of a run, with the flags given now applied on top."""
    from .config import overlay

    path = Path(run) / state.TRAIN_CONFIG
    if not state.is_run(Path(run)):
        raise ConfigError(f"{run} is not a run directory (no {state.TRAIN_CONFIG}); nothing to resume")
    values = cls.upgrade(read_json(path, "run config", error=ConfigError), str(path))
    values = overlay(values, {**overrides, "out": str(run)})
    return cls.from_dict(values, where=f"{path}")
