"""TrainConfig: every training field, validated, with its one default.

The CLI makes each field a flag (cli/options.py); a TOML file (`--config`) may
hold any field, at its top level or in a [train] table, and flags given on the
command line override the file. Optional means None: an unset length, lr or
context takes the default that its help names.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.catalog import TYPES

from ..config import DTYPE_CHOICES, MAX_SEED, MAX_TOKENS, Config, device_setting, read_toml, setting
from ..errors import ConfigError
from ..lora.config import LoRAConfig
from ..rag.embed import POOLINGS
from ..records import RecordsConfig

SCHEDULES = ("cosine", "constant", "step")
OVERFIT_STEPS = 200  # --overfit-batch's run length when none is given
DEFAULT_EPOCHS = 5.0  # the run length when no length is given
LR_FIND_STEPS = 20  # optimizer steps per learning rate of `lbdl lr-find`


@dataclass(frozen=True)
class TrainConfig(Config):
    RENAMED = {"dtype": "compute_dtype"}
    # what to train on and where
    data: str | None = setting(None, "Token shards made by `lbdl data prepare` (their tokenizer.model goes into the "
                                     "model).", metavar="DIR")
    out: str | None = setting(None, "Run directory: best/ and last/ model directories, metrics.jsonl, "
                                    "train_config.json.", metavar="DIR")
    preset: str | None = setting(None, "Model shape to pretrain (see `lbdl presets`); the vocabulary comes from the "
                                       "data.", metavar="PRESET")
    init_from: str | None = setting(None, "Fine-tune every weight of this model directory instead (same tokenizer).",
                                 metavar="MODEL")
    # length: max_steps wins, then max_tokens, then epochs
    max_steps: int | None = setting(None, "Optimizer steps to run (none: from --max-tokens or --epochs; "
                                          f"{OVERFIT_STEPS} with --overfit-batch).", low=1, high=1 << 40)
    max_tokens: int | None = setting(None, "Training tokens to consume (none: from --epochs).", low=1, high=1 << 60)
    epochs: float | None = setting(None, f"Passes over the training shard (none, with no other length: "
                                         f"{DEFAULT_EPOCHS:g}).", low=0, low_open=True, high=1e6)
    # batch
    batch_size: int = setting(16, "Sequences per micro-step and rank.", low=1, high=1 << 16)
    context: int | None = setting(None, "Tokens per sequence (none: the model's block_size).", low=1, high=MAX_TOKENS)
    grad_accum: int = setting(1, "Micro-steps per optimizer step (global batch = batch x ranks x accum).", low=1,
                              high=1 << 16)
    # optimizer: AdamW, weight decay on matrices only
    lr: float | None = setting(None, "Peak learning rate (none: 1e-3 to pretrain, 1e-4 with --init-from).",
                               low=0, low_open=True, high=10)
    min_lr: float | None = setting(None, "Floor of the decay (none: lr / 10).", low=0, high=10)
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (not biases, norms, embeddings).", low=0,
                                  high=10)
    beta1: float = setting(0.9, "AdamW beta1, in [0, 1).", low=0, high=1)
    beta2: float = setting(0.95, "AdamW beta2, in [0, 1).", low=0, high=1)
    eps: float = setting(1e-8, "AdamW epsilon.", low=0, low_open=True, high=1)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this (0: no clipping; the norm is logged).",
                               low=0, high=1e6)
    dropout: float | None = setting(None, "Dropout probability, in [0, 1) (none: keep the preset's or model's).",
                                    low=0, high=1)
    # schedule
    schedule: str = setting("cosine", "cosine (warmup, then cosine to min_lr) | constant | step.", choices=SCHEDULES)
    warmup: float = setting(0.05, "Linear warmup from lr/20: steps (>= 1) or a fraction of the run (< 1).", low=0,
                            high=1 << 40)
    decay: float = setting(1.0, "Cosine length after warmup: steps (> 1) or a fraction of the rest (<= 1).",
                           low=0, low_open=True, high=1 << 40)
    step_every: float = setting(0.33, "Step decay interval: steps (>= 1) or a fraction of the run (< 1).",
                                low=0, low_open=True, high=1 << 40)
    step_gamma: float = setting(0.1, "Step decay factor per interval.", low=0, low_open=True, high=1)
    # evaluation and checkpoints
    eval_interval: int = setting(50, "Evaluate on the validation shard and checkpoint every N steps.", low=1,
                                 high=1 << 40)
    eval_batches: int = setting(20, "Validation batches per evaluation (a fixed set).", low=1, high=1 << 20)
    patience: int | None = setting(None, "Early stopping: stop after N evaluations without improvement (none: "
                                         "never).", low=1, high=1 << 20)
    log_interval: int = setting(10, "Log loss, lr, grad norm, tokens/s and MFU every N steps.", low=1, high=1 << 40)
    # numerics and devices
    compute_dtype: str = setting("auto", "auto (bf16 autocast where the hardware has it) | float32 | bfloat16.",
                         choices=DTYPE_CHOICES)
    device: str = device_setting("auto | cpu | cuda (cuda:N).")
    compile: bool = setting(False, "Compile the model with torch.compile.")
    grad_checkpoint: int = setting(0, "Gradient checkpointing: recompute activations in the backward, in segments of "
                                      "N blocks (less memory for one more forward; 0: off).", low=0, high=1 << 10)
    fsdp: bool = setting(False, "Under torchrun: shard parameters, gradients and optimizer state (FSDP2).")
    seed: int = setting(1337, "Seed of the initialisation, the data order and dropout.", low=0, high=MAX_SEED)
    peak_tflops: float | None = setting(None, "Peak TFLOP/s for MFU (none: measured by a short matmul probe at "
                                              "start).", low=0, low_open=True, high=1e6)
    overfit_batch: bool = setting(False, "Debug check: train on one fixed batch; the loss should approach 0.")

    def __post_init__(self):
        self.check_ranges()
        for name in ("beta1", "beta2", "dropout"):
            value = getattr(self, name)
            if value is not None and value >= 1:
                raise ConfigError(f"{self.config_name()}: {name} must be in [0, 1), got {value:g}")
        if self.preset and self.init_from:
            raise ConfigError(f"{self.config_name()}: give either --preset (pretraining) or --init-from "
                              f"(fine-tuning), not both")

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.init_from else 1e-3

    @property
    def checkpoint_every(self) -> int:
        return self.grad_checkpoint

    @property
    def floor_lr(self) -> float:
        return self.base_lr / 10 if self.min_lr is None else self.min_lr


METHODS = ("lora", "qlora", "full")
OBJECTIVES = ("lm", "contrastive")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """`lbdl finetune MODEL DATA`: every option of `lbdl train` (same names, same TOML file), the method, and the
    adapters and records as tables of their own ([lora], [records] in TOML; flags on the command line)."""

    method: str = setting("lora", "lora (adapters on the frozen base) | qlora (adapters on the base quantized) | "
                                  "full (every weight).", choices=METHODS)
    quant_type: str = setting("nf4_dq", "QLoRA: the frozen base's quantization type.", choices=TYPES)
    grad_checkpoint: int | None = setting(None, "Gradient checkpointing: recompute activations in the backward, in "
                                                "segments of N blocks (0: off; none: 1 with --method qlora, as the "
                                                "QLoRA recipe, else 0).", low=0, high=1 << 10)
    objective: str = setting("lm", "lm (next-token loss on instruction records) | contrastive (DATA holds "
                                   "{query, passage} pairs: train an embedder for `lbdl rag`, in-batch negatives).",
                             choices=OBJECTIVES)
    contrastive_temperature: float = setting(0.05, "Contrastive: the softmax temperature of the cosine "
                                                   "similarities.", low=0, low_open=True, high=10)
    pooling: str = setting("eos", "Contrastive: how a text's hidden states become its embedding: eos (the state "
                                  "at the appended <eos>) | mean (over its tokens and the <eos>).", choices=POOLINGS)
    lora: LoRAConfig = setting(LoRAConfig(), "The adapters.", cli=False)
    records: RecordsConfig = setting(RecordsConfig(), "How the records are read.", cli=False)

    def __post_init__(self):
        super().__post_init__()
        if self.preset:
            raise ConfigError(f"{self.config_name()}: fine-tuning starts from a model (MODEL), not a preset")

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.method == "full" else 1e-3

    @property
    def checkpoint_every(self) -> int:
        if self.grad_checkpoint is not None:
            return self.grad_checkpoint
        return 1 if self.method == "qlora" else 0


@dataclass(frozen=True)
class LrFindConfig(Config):
    """`lbdl lr-find`: the range test's own settings (the model, data and batch are a TrainConfig's)."""

    steps: int = setting(LR_FIND_STEPS, "Optimizer steps per learning rate.", low=1, high=10_000)


def resolve(file: str | None, flags: dict, cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Defaults <- TOML file (its top level or a [train] table; `max-steps` spelt either way) <- the flags given
    (`cli.options.given`). A table of a nested config (FinetuneConfig's [lora], [records]) merges key by key."""
    values = {}
    if file:
        data, where = read_toml(file)
        data = data["train"] if isinstance(data.get("train"), dict) else data
        values = cls.upgrade({k.replace("-", "_"): v for k, v in data.items()}, where)
        cls.from_dict(values, where=where)  # names the file in errors
    return cls.from_dict(overlay(values, flags))


def overlay(values: dict, changes: dict) -> dict:
    """`values` with `changes` on top, nested tables merged rather than replaced."""
    out = dict(values)
    for key, value in changes.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
