"""What the training loop trains, handed to it: the seams between the loop and the kind of training.

The loop (loop.Trainer) owns the optimizer, the schedule, evaluation, early stopping, checkpoints'
timing, exact resume, Ctrl-C and DDP/FSDP. A kind of training owns everything else and gives it as
`Parts`: pretraining's are built by pretrain.pretraining_parts (token windows, a full model
directory per checkpoint); fine-tuning's give instruction records and adapter tensors instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ..model import GPT


class Sampler(Protocol):
    def batch(self, start: int, count: int, device="cpu") -> tuple:
        """Samples [start, start + count) of the run, a pure function of the seed and `start`: (x, y), each
        (count, context) int64; y holds -100 where no loss is taken (masked prompt tokens)."""


class Checkpoints(Protocol):
    """How a checkpoint saves and restores the trainable state (state.ModelDirectories: a full model directory;
    for adapters, only their tensors), with the optimizer, the loop's bookkeeping and the RNG."""

    def save(self, run: Path, step: int, model, optimizer, trainer: dict, rng: dict, training: dict, best: bool,
             write: bool) -> None:
        """Write checkpoint `step` of `run` and point last (and best) at it. A collective: every rank calls it
        (FSDP gathers the state), the rank with `write` writes. `trainer` is the loop's bookkeeping,
        `training` ({"step", "val_loss"}) what the saved model records of its training."""

    def load(self, run: Path, model, optimizer) -> tuple[dict, dict]:
        """Load run's last checkpoint into `model` and `optimizer` on every rank: (trainer bookkeeping, rng)."""


class Objective(Protocol):
    """A loss other than the language model's next-token cross-entropy (the loop's own), for batches whose
    samples are not token rows (contrastive pairs). The loop keeps the optimizer, schedule, clipping, evaluation,
    checkpoints and resume; the objective owns the forward and backward of a step."""

    metrics: tuple[str, ...]  # what score() measures besides the loss (logged with each evaluation)

    def loss(self, net, x, y):
        """The mean loss of one batch (x, y) of the sampler (first_loss: no grad, eval mode)."""

    def backward(self, net, batches: list, dist, autocast) -> float:
        """Forward and backward of one optimizer step: `batches` are this rank's micro-batches, `autocast()` the
        loop's autocast context. The gradients must be those of the loss of the global batch (every micro-batch
        of every rank) under DDP's mean over ranks; returns this rank's share such that the mean over ranks is
        that loss."""

    def score(self, net, x, y) -> tuple[float, float, dict]:
        """One validation batch: (loss summed over its samples, samples, other metrics summed over them)."""


@dataclass
class Parts:
    """Everything the loop trains and on what."""

    model: GPT  # the model to train, float32 on the CPU (the loop moves, wraps and compiles it)
    sampler: Sampler  # the training batches
    n_samples: int  # samples in one pass over the training data (an epoch)
    samples: str  # what a sample is, for errors: "windows of the training shard at context 256"
    val: list  # this rank's validation batches (x, y), the same at every evaluation
    context: int  # tokens per sample (tokens per step, FLOPs per token)
    checkpoints: Checkpoints
    baseline: Callable[[], float] | None = None  # a validation loss the model must beat (the unigram's)
    fresh: bool = False  # a new initialisation: its first loss should be near ln(vocabulary)
    objective: Objective | None = None  # None: the language model's loss, the loop's own
