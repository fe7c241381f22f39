"""`generate()`: one prefill, then one position per new token through a KV cache."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import ConfigError
from .processors import SamplingConfig, next_tokens
from .text import TokenCallback, _Row, encode_prompt

NoticeCallback = Callable[[str], None]


# --- results ------------------------------------------------------------------------------


@dataclass
class Generation:
    """One sample for one prompt."""

    prompt_index: int
    sample_index: int
    prompt: str | None
    text: str | None  # the new text (None when generate() had no tokenizer)
    token_ids: list[int]  # the new tokens, <eos> included when it ended the text
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" (max_new_tokens)
    prefill_s: float = 0.0  # the prompt's forward pass and the first token (shared by its batch)
    decode_s: float = 0.0  # every later token (shared by its batch)
    decode_steps: int = 0  # forward passes of one position after the prefill
    window_slides: int = 0  # times the context window slid
    batch_size: int = 1  # rows that ran together (prompts of this length x samples)
    stop: str | None = None  # the stop string that ended the text

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of one sequence after the first token."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


# --- generation ---------------------------------------------------------------------------------


def generate(model, tokenizer, prompts: list[str] | str | list[list[int]], config: SamplingConfig,
             num_samples: int = 1, on_token: TokenCallback | None = None,
             on_notice: NoticeCallback | None = None) -> list[Generation]:
    """Continue each prompt `num_samples` times; results ordered by prompt, then sample.

    `prompts`: one text, a list of texts, or a list of token-id lists. `tokenizer`
    may be None only with token ids (then no text, no <eos>, no stop strings).
    `on_token(index, text)` receives new text as it is decoded (index into the
    returned list); `on_notice(message)` is told once if the context window slides.
    """
    import torch

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompt given; pass at least one")
    if tokenizer is None and config.stop:
        raise ConfigError("stop strings need a tokenizer")
    encoded = [encode_prompt(tokenizer, p, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    device = model.device
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()  # a fresh, non-deterministic seed
    notice = _Once(on_notice)
    results: list[Generation | None] = [None] * (len(prompts) * num_samples)
    for members in groups.values():
        rows = [(p, s) for p in members for s in range(num_samples)]
        for g in _generate_batch(model, tokenizer, [encoded[p] for p, _ in rows], rows, num_samples, config,
                                 generator, on_token, notice):
            g.prompt = prompts[g.prompt_index] if isinstance(prompts[g.prompt_index], str) else None
            results[g.prompt_index * num_samples + g.sample_index] = g
    return results


class _Once:
    def __init__(self, callback):
        self.callback, self.said = callback, False

    def __call__(self, message: str):
        if not self.said and self.callback is not None:
            self.callback(message)
        self.said = True


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_batch(*args) -> list[Generation]:
    import torch

    with torch.inference_mode():
        return _decode(*args)


def _shared_prefill(model, prompts, cache, k: int):
    """Prefill rows that come in runs of k copies of one prompt (a prompt's samples) once per prompt: the
    forward runs on every k-th row, writing the cache's every k-th row (a strided view of it), then each
    prompt's keys and values are copied to its other k - 1 rows. The last position's logits (B, V)."""
    import copy

    view = copy.copy(cache)
    view.k, view.v = [t[::k] for t in cache.k], [t[::k] for t in cache.v]
    logits = model(prompts[::k], cache=view, logits_to_keep=1)[:, -1]  # (B / k, V)
    for t in cache.k + cache.v:
        runs = t.view(t.shape[0] // k, k, *t.shape[1:])  # (B / k, k, Hkv, max_len, D)
        runs[:, 1:, :, :view.length] = runs[:, :1, :, :view.length]
    cache.length = view.length
    return logits.repeat_interleave(k, dim=0)


def _decode(model, tokenizer, prompt_ids: list[list[int]], rows, num_samples, config, generator,
            on_token, notice) -> list[Generation]:
    """Generate for rows whose prompts all have the same length: one cache, one batch."""
    import torch

    from ..model import KVCache

    device = model.device
    block = model.config.block_size
    B, L = len(rows), len(prompt_ids[0])
    vocab = model.config.vocab_size
    eos = None if (tokenizer is None or config.ignore_eos) else tokenizer.eos_id
    eos = eos if eos is not None and eos >= 0 else None
    extra_vocab = tokenizer is not None and tokenizer.vocab_size < vocab  # ids the tokenizer cannot decode
    state = [_Row(p * num_samples + s, prompt_ids[k], tokenizer, config.stop, on_token is not None)
             for k, (p, s) in enumerate(rows)]
    history = torch.empty(B, L + config.max_new_tokens, dtype=torch.long, device=device)  # (B, L + N)
    history[:, :L] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    keep = max(1, block // 2)  # positions kept when the window slides
    slides = 0

    def context_message():
        return (f"prompt plus output pass the model's context of {block} tokens: sliding the window "
                f"(dropping the oldest tokens, keeping the newest {keep})")

    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, history[:, :L], True)

    def pick(logits):  # (B, V) -> (B,)
        if extra_vocab:
            logits[:, tokenizer.vocab_size:] = -math.inf
        tok = next_tokens(logits, config, seen, generator)
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        return tok

    t0 = time.perf_counter()
    cache = model.new_cache(B, max_len=min(block, L + config.max_new_tokens))  # every position it will hold
    if L > block:
        slides += 1
        notice(context_message())
    if num_samples > 1 and L <= block and isinstance(cache, KVCache):  # the samples of a prompt share its prefill
        logits = _shared_prefill(model, history[:, :L], cache, num_samples)
    else:
        logits = model(history[:, max(0, L - block):L], cache=cache, logits_to_keep=1)[:, -1]  # (B, V)
    tok = pick(logits)
    _sync(device)
    t1 = time.perf_counter()
    prefill_s, steps = t1 - t0, 0
    n = L
    for step in range(config.max_new_tokens):
        history[:, n] = tok
        n += 1
        for row, t in zip(state, tok.tolist()):
            if row.done:
                continue
            row.ids.append(t)
            if eos is not None and t == eos:
                row.done, row.finish_reason = True, "eos"
            elif row.stream is not None:
                row.add_text(row.stream.push(t))
            row.emit(on_token)
        if step == config.max_new_tokens - 1 or all(row.done for row in state):
            break
        if cache.length >= block:  # slide: rebuild the cache from the newest `keep` tokens
            slides += 1
            notice(context_message())
            cache.length = 0
            logits = model(history[:, n - keep:n], cache=cache, logits_to_keep=1)[:, -1]
        else:
            logits = model(history[:, n - 1:n], cache=cache)[:, -1]
        tok = pick(logits)
        steps += 1
    _sync(device)
    decode_s = time.perf_counter() - t1

    out = []
    for k, (row, (p, s)) in enumerate(zip(state, rows)):
        if row.stream is not None and row.finish_reason != "stop":  # bytes of an unfinished character
            row.add_text(row.stream.flush())
        row.emit(on_token, final=True)
        out.append(Generation(
            prompt_index=p, sample_index=s, prompt=None, text=row.final_text(tokenizer, prompt_ids[k]),
            token_ids=row.ids, prompt_tokens=L, finish_reason=row.finish_reason, prefill_s=prefill_s,
            decode_s=decode_s, decode_steps=steps, window_slides=slides, batch_size=B, stop=row.stop))
    return out


def summarize(results: list[Generation]) -> dict:
    """Totals over a generate() call: tokens and throughput (batches counted once)."""
    batches = {}  # one entry per batch: its rows share a prompt length
    for g in results:
        batches.setdefault(g.prompt_tokens, g)
    prefill_s = sum(g.prefill_s for g in batches.values())
    decode_s = sum(g.decode_s for g in batches.values())
    prompt_tokens = sum(g.prompt_tokens * g.batch_size for g in batches.values())
    decode_tokens = sum(g.decode_steps * g.batch_size for g in batches.values())
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": sum(g.new_tokens for g in results),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "window_slides": sum(g.window_slides for g in batches.values()),
    }
