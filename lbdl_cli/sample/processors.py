"""How to pick each new token: `SamplingConfig` and the logits processors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import MAX_SEED, MAX_TOKENS, MAX_VOCAB, Config, setting
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


# --- configuration ---------------------------------------------------------------------

_NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty")
_INTEGERS = ("top_k", "max_new_tokens", "seed")


@dataclass(frozen=True)
class SamplingConfig(Config):
    """How to pick each new token. `lbdl generate` takes its defaults from here (GenerateConfig)."""

    temperature: float = setting(0.8, "Sampling temperature; 0 = greedy (argmax).", low=0, short="-t", high=100)
    top_k: int = setting(0, "Keep the k most likely tokens; 0 = off.", low=0, high=MAX_VOCAB)
    top_p: float = setting(1.0, "Nucleus sampling: keep the most likely tokens up to this probability; 1 = off.",
                           low=0, low_open=True, high=1)
    min_p: float = setting(0.0, "Keep tokens at least this fraction as likely as the top one; 0 = off.", low=0, high=1)
    repetition_penalty: float = setting(1.0, "> 1 discourages tokens already seen; 1 = off.", low=0, low_open=True,
                                        high=100)
    max_new_tokens: int = setting(256, "Tokens to generate at most.", low=1, short="-n", high=MAX_TOKENS)
    stop: tuple[str, ...] = setting((), "Stop at this text, left out of the output (repeatable; on the command "
                                        "line \\n is a line break).")
    seed: int | None = setting(None, "Seed for reproducible sampling (default: a fresh one).", low=0, high=MAX_SEED)
    ignore_eos: bool = setting(False, "Keep generating after <eos> (benchmarks: a fixed number of tokens).")

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(stop))
        for name in _NUMBERS + _INTEGERS:  # check_ranges checks values; these are their types
            value, integer = getattr(self, name), name in _INTEGERS
            if (value is not None or name != "seed") and (isinstance(value, bool) or not isinstance(
                    value, int if integer else (int, float))):
                raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty text, got {s!r}")
        super().__post_init__()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --- logits processors (in place on float32 (B, V) logits) -------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as Hugging Face): a seen token's logit is divided by `penalty` if
    positive, multiplied if negative. `seen` is a (B, V) bool mask."""
    import torch

    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits, out=logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included); the rest -inf."""
    import torch

    if 0 < k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
        logits.masked_fill_(logits < kth, -math.inf)
    return logits


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    import torch

    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= p  # the top token always stays (before = 0 < p)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill_(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill_(probs < threshold, -math.inf)


def next_tokens(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits (modified in place): (B,) ids."""
    import torch

    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    if config.temperature != 1.0:
        logits.div_(config.temperature)
    apply_top_k(logits, config.top_k)
    apply_top_p(logits, config.top_p)
    apply_min_p(logits, config.min_p)
    probs = logits.softmax(dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p (no host sync, unlike multinomial)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return probs.div_(race).argmax(dim=-1)
