"""How to pick each new token: `SamplingConfig` and the logits processors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token. `lbdl generate` takes its defaults from here."""

    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = off
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top token's; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output; 1 = off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop at the first of these strings (it is left out of the text)
    seed: int | None = None  # a seed makes sampling reproducible; None draws a fresh one
    ignore_eos: bool = False  # keep going after <eos> (benchmarks: a fixed number of tokens)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            return value

        def integer(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return value

        if not number("temperature") >= 0 or math.isinf(self.temperature):
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if integer("top_k") < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not number("repetition_penalty") > 0 or math.isinf(self.repetition_penalty):
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if integer("max_new_tokens") < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty text, got {s!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


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
