"""Training settings for a BPE tokenizer: one frozen dataclass, validated on creation.

This module imports nothing heavy, so the CLI can take its defaults from
`TrainConfig` without loading sentencepiece.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lbdl_cli.errors import ConfigError

# The four special tokens every lbdl tokenizer has, at these ids.
UNK, BOS, EOS, PAD = "<unk>", "<bos>", "<eos>", "<pad>"
RESERVED_TOKENS = (UNK, BOS, EOS, PAD)
# Line breaks are user-defined symbols: sentencepiece reads its training text as
# lines, so they never reach a merge; as symbols they encode (and decode) exactly.
LINE_BREAKS = ("\n", "\r")
BYTE_PIECES = 256
INVALID_UTF8_CHOICES = ("error", "replace", "skip")
MAX_VOCAB_SIZE = 1_000_000


def reserved_ids(n_special_tokens: int = 0) -> int:
    """Ids taken before any learned piece: 4 specials, user specials, line breaks, 256 bytes."""
    return len(RESERVED_TOKENS) + n_special_tokens + len(LINE_BREAKS) + BYTE_PIECES


@dataclass(frozen=True)
class TrainConfig:
    """How to train a tokenizer. `lbdl tokenizer train` takes its defaults from here."""

    vocab_size: int = 4096
    special_tokens: tuple[str, ...] = field(default_factory=tuple)  # e.g. chat or tool markers
    character_coverage: float = 0.9999  # rarer characters are spelled with byte pieces
    split_digits: bool = True  # every digit its own token (as Llama does)
    max_lines: int = 1_000_000  # lines sampled for training (reservoir sample, seeded); 0 = all
    heldout_fraction: float = 0.05  # lines held out (seeded) to measure compression
    seed: int = 1337
    invalid_utf8: str = "error"  # error | replace (U+FFFD) | skip (drop the line)
    num_threads: int = 0  # 0 = every core

    def __post_init__(self):
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ConfigError(f"vocab_size must be an integer, got {self.vocab_size!r}")
        need = reserved_ids(len(self.special_tokens))
        if self.vocab_size <= need:
            raise ConfigError(
                f"vocabulary size {self.vocab_size} is too small: {len(RESERVED_TOKENS)} special tokens, "
                f"{len(self.special_tokens)} user special tokens, {len(LINE_BREAKS)} line-break symbols and "
                f"{BYTE_PIECES} byte-fallback pieces take {need} ids before any learned piece; "
                f"use --vocab-size {max(need + 64, 512)} or more")
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise ConfigError(f"vocabulary size {self.vocab_size} is too large; use at most {MAX_VOCAB_SIZE}")
        seen = set()
        for token in self.special_tokens:
            if not isinstance(token, str) or not token:
                raise ConfigError(f"special token {token!r} must be a non-empty string")
            if any(c.isspace() for c in token):
                raise ConfigError(f"special token {token!r} contains whitespace; use a token without spaces or line breaks")
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                raise ConfigError(f"special token {token!r} looks like a byte piece (<0x00>..<0xFF>); choose another name")
            if token in RESERVED_TOKENS:
                raise ConfigError(f"special token {token!r} is always present; list only extra tokens")
            if token in seen:
                raise ConfigError(f"special token {token!r} is listed twice")
            seen.add(token)
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"character coverage {self.character_coverage} must be in (0, 1], e.g. 0.9999")
        if self.max_lines < 0:
            raise ConfigError(f"max_lines {self.max_lines} must be >= 0 (0 uses every line)")
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ConfigError(f"held-out fraction {self.heldout_fraction} must be between 0 and 0.5")
        if self.invalid_utf8 not in INVALID_UTF8_CHOICES:
            raise ConfigError(f"invalid_utf8 {self.invalid_utf8!r} must be one of {', '.join(INVALID_UTF8_CHOICES)}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads {self.num_threads} must be >= 0 (0 uses every core)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        return d
