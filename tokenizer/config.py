"""Settings of the tokenizer's commands: one frozen config dataclass each, validated on creation.

`TokenizerConfig` is how to train one; `EncodeConfig`, `DecodeConfig` and `InspectConfig` are the
options of `lbdl tokenizer encode|decode|inspect`. This module imports nothing heavy, so the CLI
can take its flags and defaults from here without loading sentencepiece.
"""

from __future__ import annotations

from dataclasses import dataclass

from lbdl_cli.config import MAX_SEED, Config, setting
from lbdl_cli.errors import ConfigError

# The files of a tokenizer directory (a model directory holds the first too).
TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
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
class TokenizerConfig(Config):
    """How to train a tokenizer. `lbdl tokenizer train` takes its flags and defaults from here."""

    vocab_size: int = setting(4096, "Vocabulary size, special tokens included.", low=reserved_ids() + 1,
                              high=MAX_VOCAB_SIZE)  # __post_init__ names what the low bound is made of
    special_tokens: tuple[str, ...] = setting((), "Extra special tokens, comma-separated or repeated "
                                                  "(e.g. '<|user|>,<|assistant|>').")
    character_coverage: float = setting(0.9999, "Share of characters that get their own piece; rarer ones are "
                                                "spelled in bytes.", low=0, low_open=True, high=1)
    split_digits: bool = setting(True, "Make every digit its own token (as Llama does).")
    max_lines: int = setting(1_000_000, "Train on a seeded reservoir sample of at most this many lines (0 = all).",
                             low=0, high=1 << 40)
    heldout_fraction: float = setting(0.05, "Share of lines held out (seeded) to measure compression.", low=0, high=0.5)
    seed: int = setting(1337, "Seed for the held-out draw and the line sample.", low=0, high=MAX_SEED)
    invalid_utf8: str = setting("error", "What to do with invalid UTF-8: error | replace (U+FFFD) | skip (drop the "
                                         "line).", choices=INVALID_UTF8_CHOICES)
    num_threads: int = setting(0, "sentencepiece threads; 0 = every core.", low=0, high=1024)

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
                raise ConfigError(f"special token {token!r} contains whitespace; use a token without spaces or "
                                  f"line breaks")
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                raise ConfigError(f"special token {token!r} looks like a byte piece (<0x00>..<0xFF>); "
                                  f"choose another name")
            if token in RESERVED_TOKENS:
                raise ConfigError(f"special token {token!r} is always present; list only extra tokens")
            if token in seen:
                raise ConfigError(f"special token {token!r} is listed twice")
            seen.add(token)
        super().__post_init__()


@dataclass(frozen=True)
class EncodeConfig(Config):
    """`lbdl tokenizer encode`: what besides the text's own tokens."""

    bos: bool = setting(False, "Start with <bos>.")
    eos: bool = setting(False, "End with <eos>.")
    special: bool = setting(False, "Turn special tokens written in the text into their ids.")


@dataclass(frozen=True)
class DecodeConfig(Config):
    """`lbdl tokenizer decode`."""

    skip_special: bool = setting(False, "Drop user special tokens (they print as text otherwise).")


@dataclass(frozen=True)
class InspectConfig(Config):
    """`lbdl tokenizer inspect`."""

    top: int = setting(10, "How many of the longest pieces to list.", low=0, high=1 << 20)
    invalid_utf8: str = setting("error", "With --text: what to do with invalid UTF-8.", choices=INVALID_UTF8_CHOICES)
