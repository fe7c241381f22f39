"""The training loop: pretraining from a preset, or full fine-tuning of a model.

AdamW with weight decay on matrices only, warmup + cosine (or constant / step)
schedule, gradient clipping and accumulation, periodic evaluation with the
best checkpoint kept and early stopping, bf16 autocast with fp32 master
weights, optional torch.compile, DDP/FSDP under torchrun, exact resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import TOKENIZER_FILE, load_model, load_preset, write_json
from ..data import check_tokenizer, load_shards
from ..errors import ConfigError, DataError, RunFailed
from ..model import GPT, flops_per_token
from . import distributed, state
from ..data import WindowSampler, eval_batches, unigram_loss
from .config import TrainConfig
from .schedule import lr_at

Event = Callable[..., None]


class Interrupted(RunFailed):
    """Ctrl-C: a checkpoint was written; the CLI exits 130."""

    exit_code = 130


# --- set-up helpers --------------------------------------------------------------


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return name


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


def build_model(cfg: TrainConfig, meta: dict, data_dir: Path) -> tuple[GPT, dict]:
    """A fresh model from the preset (vocabulary from the data), or the model to fine-tune."""
    if cfg.init_from:
        model, config = load_model(cfg.init_from, dtype=torch.float32)
        if not (Path(cfg.init_from) / TOKENIZER_FILE).is_file():
            raise DataError(f"{cfg.init_from} has no {TOKENIZER_FILE}; fine-tuning needs the model's tokenizer")
        check_tokenizer(meta, cfg.init_from, data_dir)
        if model.config.vocab_size < meta["vocab_size"]:
            raise DataError(f"{cfg.init_from} has {model.config.vocab_size} tokens, fewer than the data's {meta['vocab_size']}")
        sections = {k: config[k] for k in ("tokenizer",) if k in config}
        if cfg.dropout != -1.0:
            model.set_dropout(cfg.dropout)
        return model.train(), sections
    if not cfg.preset:
        raise ConfigError("give --preset NAME to pretrain a new model or --init-from MODEL to fine-tune one")
    model_cfg, _ = load_preset(cfg.preset)
    changes = {"vocab_size": meta["vocab_size"]}
    if cfg.dropout != -1.0:
        changes["dropout"] = cfg.dropout
    torch.manual_seed(cfg.seed)
    return GPT(model_cfg.replace(**changes)), {}


# --- the loop ----------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, on_event: Event | None = None, resume: bool = False, force: bool = False):
        self.cfg, self.emit = cfg, on_event or (lambda kind, **data: None)
        self.resume, self.replace_run = resume, False
        self.dist = distributed.setup(resolve_device(cfg.device))
        self.device = self.dist.device
        self.amp = autocast_dtype(cfg.dtype, self.device)
        self.run = Path(cfg.out)
        if not cfg.data:
            raise ConfigError("give --data SHARDS (a directory made by `lbdl data prepare`)")
        if not cfg.out:
            raise ConfigError("give --out RUN, the run directory to write")
        self._check_run_dir(force)
        self.data_dir = Path(cfg.data)
        self.train_tokens, self.val_tokens, self.meta = load_shards(cfg.data)
        self.tokenizer = self.data_dir / TOKENIZER_FILE
        if not self.tokenizer.is_file():
            raise DataError(f"{self.data_dir} has no {TOKENIZER_FILE}; re-run `lbdl data prepare`")
        check_tokenizer(self.meta, self.tokenizer, self.data_dir)
        self.model, self.sections = build_model(cfg, self.meta, self.data_dir)
        mc = self.model.config
        self.context = cfg.context or mc.block_size
        if self.context > mc.block_size:
            raise ConfigError(f"--context {self.context} is longer than the model's block_size {mc.block_size}; "
                              f"use --context {mc.block_size} or less")
        self.sampler = WindowSampler(self.train_tokens, self.context, cfg.seed)
        # the validation set is fixed by the global batch; each rank scores its slice of every batch
        B, r = cfg.batch_size, self.dist.rank
        self.val = [(x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]) for x, y in
                    eval_batches(self.val_tokens, self.context, B * self.dist.world, cfg.eval_batches, cfg.seed)]
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world
        if self.samples_per_step > self.sampler.n_windows:
            raise ConfigError(
                f"a step of {cfg.batch_size} x {cfg.grad_accum} x {self.dist.world} sequences (batch x accum x ranks) "
                f"is more than the {self.sampler.n_windows} windows of the training shard at context {self.context}; "
                f"lower --batch-size, --grad-accum or --context, or use more data")
        self.tokens_per_step = self.samples_per_step * self.context
        self.total_steps = self._total_steps()
        self.model.to(self.device)
        self.net = distributed.wrap(self.model, self.dist, cfg.fsdp)  # before the optimizer: FSDP swaps parameters
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.base_lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.step, self.best_val, self.bad_evals, self.tokens_seen = 0, math.inf, 0, 0
        self.best_step = None

    # --- checks ----------------------------------------------------------------

    def _check_run_dir(self, force: bool):
        run = self.run
        if self.resume:
            if not (run / "last").exists():
                raise ConfigError(f"{run} has no last/ checkpoint to resume from")
            return
        if run.exists() and any(run.iterdir()):
            if not force:
                what = "another run" if state.is_run(run) else "files"
                raise ConfigError(f"{run} already holds {what}; pass --resume {run} to continue it or --force to start over")
            self.replace_run = True  # removed once every other check has passed (in fit)

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps:
            return cfg.max_steps
        if cfg.overfit_batch:
            return 200
        if cfg.max_tokens:
            return max(1, math.ceil(cfg.max_tokens / self.tokens_per_step))
        epochs = cfg.epochs or 5.0
        return max(1, math.ceil(epochs * self.sampler.n_windows / self.samples_per_step))

    # --- pieces of a step ------------------------------------------------------

    def _loss(self, x, y):
        with autocast(self.device, self.amp):
            return self.net(x, targets=y)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.net.eval()
        total, count = 0.0, 0
        for x, y in self.val:
            if len(x):
                total += self._loss(x.to(self.device), y.to(self.device)).item() * x.shape[0]
                count += x.shape[0]
        self.net.train()
        total, count = self.dist.sum(total), self.dist.sum(count)
        return total / count

    def _rng(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self, rng: dict):
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _save(self, best: bool):
        """Checkpoint (a collective under FSDP: every rank gathers, rank 0 writes)."""
        trainer = {"best_val": self.best_val if math.isfinite(self.best_val) else None, "best_step": self.best_step,
                   "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen, "total_steps": self.total_steps}
        sections = {**self.sections, "training": {"step": self.step, "val_loss": self.last_val,
                                                  "data": str(self.data_dir)}}
        model_state, optim_state = distributed.full_state(self.model, self.optimizer)
        if self.dist.main:
            state.save_checkpoint(self.run, self.step, self.model.config, model_state, optim_state, trainer,
                                  self.rng_after, self.tokenizer, sections, best)
        self.dist.barrier()

    def _restore(self):
        last = (self.run / "last").resolve()
        loaded, _ = load_model(last, dtype=torch.float32)
        trainer, optim_state, rng = state.load_trainer_state(last)
        distributed.load_full_state(self.model, self.optimizer, loaded.state_dict(), optim_state)
        self.step = trainer["step"]
        self.best_val = trainer["best_val"] if trainer["best_val"] is not None else math.inf
        self.best_step, self.bad_evals = trainer["best_step"], trainer["bad_evals"]
        self.tokens_seen = trainer["tokens_seen"]
        self._set_rng(rng)
        if self.dist.main:
            state.truncate_metrics(self.run, self.step)

    def _log(self, record: dict):
        if self.dist.main:
            state.append_metrics(self.run, record)

    # --- run ----------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, d = self.cfg, self.dist
        if self.resume:
            self._restore()
        elif d.main and self.replace_run:
            shutil.rmtree(self.run)
        if d.main:  # on resume too: flags given then (a longer --max-steps, say) are part of the run now
            self.run.mkdir(parents=True, exist_ok=True)
            write_json(self.run / state.TRAIN_CONFIG, cfg.to_dict())
        d.barrier()
        peak = cfg.peak_tflops or measure_peak_tflops(self.device, self.amp)
        flops = flops_per_token(self.model.config, self.context, training=True)
        baseline = unigram_loss(self.train_tokens, self.val_tokens, self.meta["vocab_size"])
        ln_v = math.log(self.model.config.vocab_size)
        x0, y0 = self.sampler.batch(0, cfg.batch_size, self.device)
        self.net.eval()
        with torch.no_grad():
            initial = d.mean(self._loss(x0, y0).item())
        self.net.train()
        start_info = dict(total_steps=self.total_steps, start_step=self.step, params=self.model.num_params(),
                          tokens_per_step=self.tokens_per_step, initial_loss=initial, ln_vocab=ln_v,
                          unigram_loss=baseline, peak_tflops=peak, world=d.world, device=self.device,
                          dtype="bfloat16" if self.amp else "float32", context=self.context)
        if d.main:
            self.emit("start", **start_info)
            if not cfg.init_from and not self.resume and abs(initial - ln_v) > 0.5:
                self.emit("warn", message=f"initial loss {initial:.3f} is more than 0.5 from ln(V) = {ln_v:.3f}: "
                                          f"check the initialisation and the data")
        self.last_val = None
        self.rng_after = self._rng()
        stop_reason = "max_steps"
        interrupted = {"flag": False}
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if interrupted["flag"]:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            interrupted["flag"] = True

        in_main_thread = True
        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread (tests): no handler
            in_main_thread = False
        try:
            t_last, tokens_last = time.perf_counter(), self.tokens_seen
            loss = math.nan
            while self.step < self.total_steps:
                if d.any(interrupted["flag"]):
                    self._save(best=False)
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint written to {self.run / 'last'} "
                                      f"(continue with --resume {self.run})")
                loss, grad_norm, lr = self._train_step()
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                if not math.isfinite(loss):
                    where = f"{self.run / 'last'} (step {self._last_saved_step()})" if (self.run / "last").exists() else "none was written yet"
                    raise RunFailed(f"loss became {loss} at step {self.step}; stopped. Last good checkpoint: {where}. "
                                    f"Lower --lr or check the data")
                if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    tps = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, self.tokens_seen
                    mfu = tps * flops / (peak * 1e12 * d.world)
                    record = dict(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens_seen,
                                  tokens_per_s=tps, mfu=mfu)
                    self._log(record)
                    if d.main:
                        self.emit("step", **record)
                elif d.main:
                    self.emit("tick", step=self.step, loss=loss, lr=lr)
                if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                    if self._evaluate_and_save():
                        stop_reason = "early_stopping"
                        break
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, previous)
        result = dict(run=str(self.run), steps=self.step, stop_reason=stop_reason, best_val_loss=self.best_val,
                      best_step=self.best_step, last_val_loss=self.last_val, unigram_loss=baseline,
                      initial_loss=initial, final_loss=loss, tokens=self.tokens_seen, params=self.model.num_params())
        if cfg.overfit_batch:  # the bug check: a sound model and loop drive one batch's loss towards 0
            result["overfit_passed"] = loss < 0.1 * initial
        if d.main:
            self.emit("done", **result)
        return result

    def _last_saved_step(self):
        return json.loads(((self.run / "last").resolve() / state.TRAINER_FILE).read_text())["step"]

    def _train_step(self) -> tuple[float, float, float]:
        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            if cfg.overfit_batch:
                start = d.rank * cfg.batch_size
            else:
                start = ((self.step * cfg.grad_accum + micro) * d.world + d.rank) * cfg.batch_size
            x, y = self.sampler.batch(start, cfg.batch_size, self.device)
            sync = micro == cfg.grad_accum - 1 or not hasattr(self.net, "no_sync")
            with contextlib.nullcontext() if sync else self.net.no_sync():
                loss = self._loss(x, y) / cfg.grad_accum
                loss.backward()
            total += loss.item()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rng_after = self._rng()
        return d.mean(total), grad_norm, lr

    def _evaluate_and_save(self) -> bool:
        """Evaluate, checkpoint (last, and best when improved); True when patience ran out."""
        cfg = self.cfg
        val = self.evaluate()
        self.last_val = val
        improved = val < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
        else:
            self.bad_evals += 1
        record = dict(step=self.step, val_loss=val, best_val_loss=self.best_val, improved=improved)
        self._log(record)  # before the checkpoint: a resume from it must not lose this line
        self._save(best=improved)
        if self.dist.main:
            self.emit("eval", **record)
        return bool(cfg.patience) and self.bad_evals >= cfg.patience


def train(cfg: TrainConfig, on_event: Event | None = None, resume: bool = False, force: bool = False) -> dict:
    trainer = Trainer(cfg, on_event, resume=resume, force=force)
    try:
        return trainer.fit()
    finally:
        distributed.teardown(trainer.dist)


def resume_config(run: str | Path, overrides: dict) -> TrainConfig:
    """The saved config of a run, with the flags given now applied on top."""
    path = Path(run) / state.TRAIN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run} is not a run directory (no {state.TRAIN_CONFIG}); nothing to resume")
    values = json.loads(path.read_text())
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["out"] = str(run)
    return TrainConfig.from_dict(values)


