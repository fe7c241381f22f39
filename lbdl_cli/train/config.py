"""TrainConfig: every training field, validated, with its one default.

The CLI takes its defaults from here; a TOML file (`--config`) may hold any
field, and flags given on the command line override the file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..errors import ConfigError

SCHEDULES = ("cosine", "constant", "step")


def _f(default, help: str):
    """A field with its default and its --help text, in one place."""
    return field(default=default, metadata={"help": help})
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    # what to train on and where
    data: str = _f("", "Token shards made by `lbdl data prepare` (their tokenizer.model goes into the model).")
    out: str = _f("", "Run directory: best/ and last/ model directories, metrics.jsonl, train_config.json.")
    preset: str = _f("", "Model shape to pretrain (see `lbdl presets`); the vocabulary comes from the data.")
    init_from: str = _f("", "Fine-tune every weight of this model directory instead (same tokenizer).")
    # length: max_steps wins, then max_tokens, then epochs (default 5 epochs)
    max_steps: int = _f(0, "Optimizer steps to run (0: from --max-tokens or --epochs).")
    max_tokens: int = _f(0, "Training tokens to consume (0: unused).")
    epochs: float = _f(0.0, "Passes over the training shard (0 with no other length: 5).")
    # batch
    batch_size: int = _f(16, "Sequences per micro-step and rank.")
    context: int = _f(0, "Tokens per sequence (0: the model's block_size).")
    grad_accum: int = _f(1, "Micro-steps per optimizer step (global batch = batch x ranks x accum).")
    # optimizer: AdamW, weight decay on matrices only
    lr: float = _f(0.0, "Peak learning rate (0: 1e-3 to pretrain, 1e-4 with --init-from).")
    min_lr: float = _f(-1.0, "Floor of the decay (-1: lr / 10).")
    weight_decay: float = _f(0.1, "AdamW weight decay, on matrices only (not biases, norms, embeddings).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping; the norm is logged).")
    dropout: float = _f(-1.0, "Dropout probability (-1: keep the preset's or model's).")
    # schedule
    schedule: str = _f("cosine", "cosine (warmup, then cosine to min_lr) | constant | step.")
    warmup: float = _f(0.05, "Linear warmup from lr/20: steps (>= 1) or a fraction of the run (< 1).")
    decay: float = _f(1.0, "Cosine length after warmup: steps (> 1) or a fraction of the rest (<= 1).")
    step_every: float = _f(0.33, "Step decay interval: steps (>= 1) or a fraction of the run (< 1).")
    step_gamma: float = _f(0.1, "Step decay factor per interval.")
    # evaluation and checkpoints
    eval_interval: int = _f(50, "Evaluate on the validation shard and checkpoint every N steps.")
    eval_batches: int = _f(20, "Validation batches per evaluation (a fixed set).")
    patience: int = _f(0, "Early stopping: stop after N evaluations without improvement (0: never).")
    log_interval: int = _f(10, "Log loss, lr, grad norm, tokens/s and MFU every N steps.")
    # numerics and devices
    dtype: str = _f("auto", "auto (bf16 autocast where the hardware has it) | float32 | bfloat16.")
    device: str = _f("auto", "auto | cpu | cuda.")
    compile: bool = _f(False, "Compile the model with torch.compile.")
    fsdp: bool = _f(False, "Under torchrun: shard parameters, gradients and optimizer state (FSDP2).")
    seed: int = _f(1337, "Seed of the initialisation, the data order and dropout.")
    peak_tflops: float = _f(0.0, "Peak TFLOP/s for MFU (0: measured by a short matmul probe at start).")
    overfit_batch: bool = _f(False, "Debug check: train on one fixed batch; the loss should approach 0.")

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ConfigError(f"train config: {message}")

        for name in ("max_steps", "max_tokens", "context", "eval_interval", "patience", "log_interval"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "eval_batches"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.lr >= 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        check(self.min_lr == -1.0 or self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        check(self.dropout == -1.0 or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        check(self.decay > 0, f"decay must be > 0, got {self.decay}")
        check(self.step_every > 0, f"step_every must be > 0, got {self.step_every}")
        check(0 < self.step_gamma <= 1, f"step_gamma must be in (0, 1], got {self.step_gamma}")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.peak_tflops >= 0, f"peak_tflops must be >= 0, got {self.peak_tflops}")
        check(not (self.preset and self.init_from),
              "give either --preset (pretraining) or --init-from (fine-tuning), not both")

    @property
    def base_lr(self) -> float:
        return self.lr or (1e-4 if self.init_from else 1e-3)

    @property
    def floor_lr(self) -> float:
        return self.base_lr / 10 if self.min_lr == -1.0 else self.min_lr

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "train config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(known)}")
        values = {}
        for k, v in d.items():
            kind = type(known[k].default)
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise ConfigError(f"{where}: {k} must be a {kind.__name__}, got {v!r}")
            values[k] = v
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def load_toml(path: str) -> dict:
    """The fields of a TOML training config (top level or a [train] table)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e})") from None
    data = data.get("train", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(file: str | None, flags: dict) -> TrainConfig:
    """Defaults <- TOML file <- flags that were given (not None)."""
    values = load_toml(file) if file else {}
    TrainConfig.from_dict(values, where=f"config file {file}")  # names the file in errors
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig.from_dict(values)
