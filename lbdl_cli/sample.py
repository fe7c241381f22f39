"""Sampling: logits processors and `generate()` with a KV cache.

    from lbdl_cli.sample import SamplingConfig, generate, load_for_inference
    model, tok, _ = load_for_inference("run/best")
    [out] = generate(model, tok, "To be, or not", SamplingConfig(temperature=0.8, top_p=0.95, seed=1))
    print(out.text, out.decode_tokens_per_s)

`generate` runs one prefill of the prompt (the head only on its last
position), then one position per new token through a preallocated KV cache.
The logits processors run in this order, as Hugging Face's do: repetition
penalty, temperature, top-k, top-p, min-p; temperature 0 is greedy (argmax
after the penalty). Prompts of equal length share one batch (and one cache);
prompts of other lengths run as batches of their own, so nothing is padded.
When prompt plus output would pass the model's context, the window slides: the
oldest tokens are dropped and the cache is rebuilt from the newest half of the
context (llama.cpp's context shift), and `on_notice` is told once.

Library code never prints: text reaches the caller through `on_token(index,
text)` as it is decoded, and through the returned `Generation`s.

Speed on a CPU, where a small model's decoding is bound by reading its weights
once per token: q, k and v are one matrix multiply (model.py), the KV cache is
float32 and sized for the prompt plus max_new_tokens, float32 weights are kept
column-major (`inference_layout`), and a single bfloat16 sequence decodes with
torch's own matrix-vector kernels instead of oneDNN's (`_single_row_gemv`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

TokenCallback = Callable[[int, str], None]  # (result index, new text)
NoticeCallback = Callable[[str], None]
STREAM_CONTEXT = 4  # prompt tokens decoded before the new ones, so a leading space survives


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


# --- loading --------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (None) = cuda when torch sees one, else cpu; cuda asked for without one is refused."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = device or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu "
                          "or install a CUDA build of torch")
    return torch.device(name)


def load_for_inference(model_arg: str | os.PathLike | None, dtype: str | torch.dtype | None = None,
                       device: str | torch.device | None = "cpu"):
    """(model, tokenizer, config.json) of a model directory; None = the bundled default model.

    dtype None or "auto" keeps the stored precision, except float16 on a CPU,
    which becomes float32 (float16 is hundreds of times slower there).
    """
    import torch

    from tokenizer import Tokenizer

    from .checkpoint import TOKENIZER_FILE, default_model_dir, load_model, parse_dtype, read_config

    dir = Path(model_arg) if model_arg is not None else default_model_dir()
    read_config(dir)  # a missing or foreign directory fails here, before the tokenizer check
    if not (dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{dir} has no {TOKENIZER_FILE}, so its text cannot be encoded; copy in the "
                              f"tokenizer the model was trained with (cp TOKENIZER_DIR/{TOKENIZER_FILE} {dir}/)")
    device = resolve_device(device)
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 is hundreds of times slower on a CPU; use --dtype float32 or bfloat16")
    model, config = load_model(dir, dtype=dtype, device=device)
    if dtype is None and device.type == "cpu" and model.tok_emb.weight.dtype == torch.float16:
        model = model.float()
    inference_layout(model)
    tok = Tokenizer.load(dir)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; the tokenizer.model does not belong to this model")
    return model, tok, config


def inference_layout(model):
    """Store a CPU float32 model's matrices column-major, in place: same values, same shapes, but
    each weight becomes a transposed view of a (in, out) tensor, which torch multiplies by one
    vector ~30% faster (decoding reads every weight once per token; Hugging Face's GPT-2 keeps its
    Conv1D weights this way too). Prompt-sized products run as fast either way. bfloat16 and GPU
    weights are left as they are. Returns the model."""
    import torch
    import torch.nn as nn

    w = model.tok_emb.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    params = [m.weight for m in model.modules() if type(m) is nn.Linear]
    if model.config.tie_embeddings:
        params.append(w)  # the head is the embedding matrix
    with torch.no_grad():
        for p in params:
            if isinstance(p, torch.Tensor) and p.dim() == 2 and p.stride(0) != 1:  # not packed, not done
                p.data = p.data.t().contiguous().t()
    return model


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
    device = model.tok_emb.weight.device
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


@contextlib.contextmanager
def _onednn(enabled: bool):
    """Switch torch's use of oneDNN (mkldnn) on CPUs, and back on exit."""
    import torch

    previous = torch.backends.mkldnn.set_flags(enabled, None, None, None)[0]
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(previous, None, None, None)


def _single_row_gemv(model, rows: int):
    """One-token steps of a single bfloat16 sequence on a CPU skip oneDNN: its kernels are tuned
    for matrices, and torch's own matrix-vector product reads bfloat16 weights 2-3x faster (with
    two rows or more, or in float32, oneDNN is as fast or faster). Process-wide while it lasts."""
    import torch

    w = model.tok_emb.weight
    if rows == 1 and w.device.type == "cpu" and w.dtype == torch.bfloat16:
        return _onednn(False)
    return contextlib.nullcontext()

def _generate_batch(*args) -> list[Generation]:
    import torch

    with torch.inference_mode():
        return _decode(*args)


def _decode(model, tokenizer, prompt_ids: list[list[int]], rows, num_samples, config, generator,
            on_token, notice) -> list[Generation]:
    """Generate for rows whose prompts all have the same length: one cache, one batch."""
    import torch

    device = model.tok_emb.weight.device
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
    logits = model(history[:, max(0, L - block):L], cache=cache, logits_to_keep=1)[:, -1]  # (B, V)
    tok = pick(logits)
    _sync(device)
    t1 = time.perf_counter()
    prefill_s, steps = t1 - t0, 0
    n = L
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled  # the caller's setting
    with _single_row_gemv(model, B):
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
                with _onednn(onednn):  # a prompt-sized pass: the caller's kernels again
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
