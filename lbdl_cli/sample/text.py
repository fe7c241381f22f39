"""Prompts in, text out: encoding a prompt, and decoding new tokens one at a time with stop strings."""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import ConfigError

TokenCallback = Callable[[int, str], None]  # (result index, new text)
STREAM_CONTEXT = 4  # prompt tokens decoded before the new ones, so a leading space survives
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` as typed on a command line (a --stop string), as the characters."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in ESCAPES:
            out.append(ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --- prompts ----------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str | Sequence[int], index: int | None = None) -> list[int]:
    """Token ids of a prompt (text, with the tokenizer's user special tokens recognised, or ids)."""
    where = "the prompt" if index is None else f"prompt {index + 1}"
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ConfigError("text prompts need a tokenizer; pass one, or token ids")
        if not prompt:
            raise ConfigError(f"{where} is empty; give some text for the model to continue")
        ids = tokenizer.encode(prompt, allow_special=True)
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise ConfigError(f"{where} is empty; give some tokens for the model to continue")
    if tokenizer is not None and all(tokenizer.is_special(i) for i in ids):
        names = ", ".join(sorted({tokenizer.id_to_piece(i) for i in ids}))
        raise ConfigError(f"{where} holds only special tokens ({names}); give some text for the model to continue")
    return ids


# --- incremental decoding ------------------------------------------------------------------------


class TextStream:
    """Decode tokens one at a time, cheaply and exactly.

    Each step decodes only the few tokens since the last clean cut (and the one
    before, so that a tokenizer's leading-space handling is the same as in a full
    decode); text ending in an incomplete UTF-8 sequence waits for its next byte.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids = list(context)[-STREAM_CONTEXT:]
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is pending (an unfinished byte sequence decodes to U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        delta = self.tok.decode(self.ids[self.prefix:])[len(prefix_text):]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class _Row:
    """The bookkeeping of one sequence of a batch: its tokens, text, stop and streaming."""

    def __init__(self, index: int, prompt_ids: list[int], tokenizer, stops: tuple[str, ...], stream: bool):
        self.index = index
        self.ids: list[int] = []
        self.done = False
        self.finish_reason = "length"
        self.stop = None
        self.stops = stops
        self.stream = TextStream(tokenizer, prompt_ids) if (tokenizer is not None and (stream or stops)) else None
        self.text_end = None  # where a stop string cut the text
        self.emitted = 0  # characters given to on_token

    def _safe_end(self) -> int:
        """Text that cannot turn out to be the start of a stop string."""
        text = self.stream.text
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return len(text) - hold

    def add_text(self, delta: str) -> None:
        if not delta or not self.stops:
            return
        text = self.stream.text
        longest = max(len(s) for s in self.stops)
        window_start = max(0, len(text) - len(delta) - longest + 1)
        hits = [(text.find(s, window_start), s) for s in self.stops]
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            at, s = min(hits)
            self.text_end, self.stop = at, s
            self.done, self.finish_reason = True, "stop"

    def emit(self, on_token: TokenCallback | None, final: bool = False) -> None:
        if on_token is None or self.stream is None:
            return
        if self.text_end is not None:
            end = self.text_end
        elif final or not self.stops:
            end = len(self.stream.text)
        else:
            end = self._safe_end()
        if end > self.emitted:
            on_token(self.index, self.stream.text[self.emitted:end])
            self.emitted = end

    def final_text(self, tokenizer, prompt_ids: list[int]) -> str | None:
        if tokenizer is None:
            return None
        if self.stream is not None:
            return self.stream.text if self.text_end is None else self.stream.text[:self.text_end]
        context = prompt_ids[-STREAM_CONTEXT:]
        return tokenizer.decode(context + self.ids)[len(tokenizer.decode(context)):]
