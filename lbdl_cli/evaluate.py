"""Evaluation: perplexity and bits per byte of a text, exact-match accuracy on a task file.

Perplexity follows llama.cpp's `llama-perplexity` by default: the token stream
is cut into non-overlapping windows of `ctx` tokens, each scored from scratch,
and only the second half of each window counts, so every scored token has at
least ctx/2 tokens of context. With `stride` it is the sliding-window
convention of Hugging Face's perplexity guide instead: windows of `ctx` start
every `stride` tokens and each scores only the tokens that no earlier window
scored (the last window is moved back to end at the last token, keeping its
full length).

    from lbdl_cli.evaluate import PerplexityConfig, perplexity, perplexity_of_file
    result = perplexity(model, ids, ctx=256)          # any loaded GPT and token ids
    result["perplexity"], result["std_error"], result["tokens"]
    perplexity_of_file("run/best", "val.txt", PerplexityConfig(context=256))   # `lbdl eval perplexity`

Progress is reported as windows ("perplexity") and records ("task") done.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .config import (
    MAX_SEED,
    MAX_TOKENS,
    Config,
    adapter_setting,
    device_setting,
    dtype_setting,
    engine_setting,
    force_base_setting,
    setting,
)
from .errors import ConfigError, DataError
from .files import read_jsonl, read_text
from .progress import Progress, report
from .prompting import (
    EXTRACT_METHODS,
    PromptConfig,
    _compile,
    build_prompt,
    canonical_number,
    extract_answer,
    is_correct,
    load_shots,
    majority_vote,
    resolve_method,
)
from .sample import SamplingConfig, generate, load_for_inference
from .sample.loading import describe
from .sample.run import stop_strings

if TYPE_CHECKING:
    import torch

MAX_LOGITS = 1 << 26  # floats of logits per forward pass (256 MB in float32): caps the rows per batch


# --- configs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityConfig(Config):
    """`lbdl eval perplexity`: the windows and how the model runs."""

    RENAMED = {"ctx": "context", "dtype": "compute_dtype"}
    context: int | None = setting(None, "Window length in tokens (default: the model's context).", low=4,
                                  high=MAX_TOKENS)
    stride: int | None = setting(None, "Sliding windows every S tokens, each scoring its new tokens (default: "
                                       "llama.cpp's non-overlapping windows, second half scored).", low=1,
                                 high=MAX_TOKENS)
    batch_size: int = setting(8, "Windows per forward pass.", low=1, high=1 << 16)
    compute_dtype: str = dtype_setting()
    device: str = device_setting()
    engine: str = engine_setting()
    adapter: str | None = adapter_setting()
    force_base: bool = force_base_setting()

    def __post_init__(self):
        super().__post_init__()
        if self.stride is not None and self.context is not None and self.stride > self.context:
            raise ConfigError(f"stride {self.stride} is larger than the context {self.context}; "
                              f"use a stride between 1 and {self.context}")


@dataclass(frozen=True)
class TaskConfig(Config):
    """`lbdl eval task`: greedy completions, how an answer is read from them, and how the model runs."""

    RENAMED = {"dtype": "compute_dtype"}

    extract: str = setting("auto", "How to read the answer from a completion (auto: choice if the record lists "
                                   "choices, number if the answer is one, else exact).", choices=EXTRACT_METHODS)
    pattern: str | None = setting(None, "Regular expression for --extract regex (group 1 is the answer).",
                                  metavar="REGEX")
    max_new_tokens: int = setting(32, "Tokens per completion at most.", low=1, high=MAX_TOKENS)
    temperature: float = setting(0.0, "Sampling temperature of the completions; 0 = greedy.", low=0, high=100)
    self_consistency: int = setting(1, "Self-consistency: sample K chains per record (sharing the prompt's "
                                       "prefill) and take the majority of their answers; needs --temperature above "
                                       "0.", low=1, high=1 << 10, metavar="K")
    answer_marker: str | None = setting(None, "Read the answer only after the last occurrence of this text (e.g. "
                                              "'The answer is'); a completion without it gives no answer.",
                                        metavar="TEXT")
    seed: int = setting(0, "Seed of the sampled chains and of the shots' selection.", low=0, high=MAX_SEED)
    stop: tuple[str, ...] = setting(("\\n",), "Stop strings, as typed on a command line (\\n is a line break).")
    batch_size: int = setting(8, "Prompts per generate() call.", low=1, high=1 << 16)
    show: int = setting(0, "Print the first N records with their completions.", low=0, high=1 << 30)
    compute_dtype: str = dtype_setting()
    device: str = device_setting()
    engine: str = engine_setting()
    adapter: str | None = adapter_setting()
    force_base: bool = force_base_setting()

    def __post_init__(self):
        super().__post_init__()
        if self.self_consistency > 1 and self.temperature == 0:
            raise ConfigError(f"self-consistency with {self.self_consistency} chains at temperature 0: every chain "
                              f"would be the same; give --temperature above 0 (e.g. 0.7)")

    @property
    def sampling(self) -> SamplingConfig:
        """The SamplingConfig of the completions (greedy unless a temperature is given)."""
        return SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                              stop=stop_strings(self.stop), seed=self.seed)


# --- perplexity ------------------------------------------------------------------------------


def windows(n: int, ctx: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(start, first) per window: tokens [start, start + ctx) are fed, and the targets at
    window positions first + 1 .. ctx - 1 are scored."""
    if stride is None:  # llama.cpp: non-overlapping windows, the second half scored
        return [(i * ctx, ctx // 2) for i in range(n // ctx)]
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + ctx, n)
        start = end - ctx
        out.append((start, max(prev_end - start - 1, 0)))
        prev_end = end
        if end == n:
            return out
        begin += stride


def perplexity(model, ids, ctx: int, stride: int | None = None, batch_size: int = PerplexityConfig.batch_size,
               n_bytes: int | None = None, progress: Progress | None = None,
               token_bytes: Sequence[int] | torch.Tensor | None = None,
               on_logits: Callable[[torch.Tensor], None] | None = None) -> dict:
    """Perplexity of `model` on the token stream `ids` (a 1-D sequence of ints).

    Returns perplexity, nll (mean nats per scored token), std_error (of the
    perplexity, as llama.cpp: ppl * sqrt(var(nll) / (N - 1))), nll_std_error,
    tokens (scored), windows, ctx, stride, convention, tokens_evaluated (fed
    through the model), seconds, tokens_per_s (evaluated tokens per second) and,
    with `token_bytes` (bytes of each vocabulary id) or `n_bytes` (bytes of the
    text `ids` encode), bits_per_byte = nats / ln 2 / bytes of the scored tokens
    (exact with token_bytes; with n_bytes, its share for the scored tokens).
    At most `batch_size` windows go through the model at once (fewer when their
    logits would pass MAX_LOGITS floats).
    `on_logits`, when given, sees each batch's logits (b, keep - 1, V) at the positions
    first .. ctx - 2 of its windows, in order, before they are scored.
    """
    import torch
    import torch.nn.functional as F

    if not isinstance(ids, torch.Tensor):
        import numpy as np

        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    ids = ids.long().flatten().cpu()
    n = ids.numel()
    block = model.config.block_size
    PerplexityConfig.from_dict({"context": ctx, "stride": stride, "batch_size": batch_size})  # types and ranges
    if ctx > block:
        raise ConfigError(f"context {ctx} is longer than the model's (block_size {block}); "
                          f"use --context {block} or less")
    if n < ctx:
        raise DataError(f"the text has {n} tokens, fewer than one window: context {ctx} needs at least {ctx} "
                        f"tokens (use a longer text or a smaller --context)")
    vocab = model.config.vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise DataError(f"token id {lo if lo < 0 else hi} is out of range for the model's vocabulary of {vocab}")
    plan = windows(n, ctx, stride)
    device = model.device
    if token_bytes is not None:
        token_bytes = torch.as_tensor(token_bytes, dtype=torch.long)
    total = total_sq = 0.0
    count = scored_bytes = 0
    done = 0
    start_time = time.perf_counter()
    with torch.inference_mode():
        i = 0
        while i < len(plan):
            first = min(a for _, a in plan[i:i + batch_size])
            keep = ctx - first
            rows = max(1, min(batch_size, MAX_LOGITS // (keep * vocab)))
            batch = plan[i:i + rows]
            first = min(a for _, a in batch)
            keep = ctx - first
            x = torch.stack([ids[s:s + ctx] for s, _ in batch])  # (b, ctx)
            logits = model(x.to(device), logits_to_keep=keep)[:, :-1]  # (b, keep - 1, V): positions first..ctx-2
            if on_logits is not None:  # e.g. the sweep's KL divergence against a reference, in the same pass
                on_logits(logits)
            targets = x[:, first + 1:].to(device)  # (b, keep - 1)
            nll = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
            nll = nll.view(len(batch), keep - 1).double().cpu()
            pos = torch.arange(first, ctx - 1)  # window position of each logit
            mask = pos[None, :] >= torch.tensor([a for _, a in batch])[:, None]  # (b, keep - 1)
            chosen = nll[mask]
            total += float(chosen.sum())
            total_sq += float((chosen * chosen).sum())
            count += int(chosen.numel())
            if token_bytes is not None:
                scored_bytes += int(token_bytes[x[:, first + 1:]][mask].sum())
            i += len(batch)
            done += len(batch)
            report(progress, "perplexity", done, len(plan), unit="windows")
    seconds = time.perf_counter() - start_time
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    nll_se = math.sqrt(var / (count - 1)) if count > 1 else 0.0
    ppl = math.exp(mean)
    evaluated = len(plan) * ctx
    result = {
        "perplexity": ppl, "std_error": ppl * nll_se, "nll": mean, "nll_std_error": nll_se,
        "tokens": count, "windows": len(plan), "ctx": ctx, "stride": stride,
        "convention": "llama.cpp" if stride is None else "sliding",
        "tokens_evaluated": evaluated, "seconds": seconds,
        "tokens_per_s": evaluated / seconds if seconds > 0 else 0.0,
    }
    if token_bytes is None and n_bytes is not None:
        scored_bytes = n_bytes * count / n
    if token_bytes is not None or n_bytes is not None:
        result["bytes"] = scored_bytes
        result["bits_per_byte"] = total / math.log(2) / scored_bytes if scored_bytes else float("nan")
    return result


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each id decodes to (a byte piece is one byte, a special token none)."""
    out = []
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_byte(i):
            out.append(1)
        elif tokenizer.is_special(i):
            out.append(0)
        else:
            out.append(len(tokenizer.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return out


def scoring_inputs(tokenizer, text: str) -> tuple[list[int], dict]:
    """(ids, byte arguments of `perplexity`) of a text: the bytes of each id where the tokenizer is exact
    (its tokens' bytes add up to the text's), else the text's byte count."""
    ids = tokenizer.encode(text)
    lengths = token_byte_lengths(tokenizer)
    n_bytes = len(text.encode("utf-8"))
    exact = sum(lengths[i] for i in ids) == n_bytes
    return ids, ({"token_bytes": lengths} if exact else {"n_bytes": n_bytes})


def perplexity_of_file(model_dir: str | os.PathLike | None, path: str | os.PathLike,
                       cfg: PerplexityConfig | None = None, progress: Progress | None = None) -> dict:
    """`perplexity` of a model directory (None: the bundled default) on a UTF-8 text file."""
    cfg = cfg or PerplexityConfig()
    text = read_text(path, "text file")
    model, tok, _ = load_for_inference(model_dir, cfg.compute_dtype, cfg.device, progress=progress,
                                       adapter=cfg.adapter, force_base=cfg.force_base,
                                       engine=cfg.engine)
    ctx = model.config.block_size if cfg.context is None else cfg.context
    ids, byte_args = scoring_inputs(tok, text)
    n_bytes = len(text.encode("utf-8"))
    try:
        result = perplexity(model, ids, ctx, stride=cfg.stride, batch_size=cfg.batch_size, progress=progress,
                            **byte_args)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return {"model": str(model_dir) if model_dir is not None else "default", "file": str(path),
            "file_tokens": len(ids), "file_bytes": n_bytes, **describe(model), **result}


# --- task accuracy --------------------------------------------------------------------------



def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL task file: {"prompt": ..., "answer": ...} (+ optional choices, extract, pattern).

    Each is checked as it is read; an error names the file and the line (`tasks.jsonl:3: ...`)."""
    records = []
    for n, rec in read_jsonl(path, "task file"):
        where = f"task file {path}:{n}:"
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise DataError(f'{where} no "prompt" text; each line must be one {{"prompt": ..., "answer": ...}} '
                            f"object")
        answer = rec.get("answer")
        if (isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == ""
                or (isinstance(answer, float) and not math.isfinite(answer))):
            raise DataError(f'{where} "answer" must be a non-empty string or a finite number, got {answer!r}'
                            if "answer" in rec else f'{where} no "answer" (a string or a number)')
        if "choices" in rec and (not isinstance(rec["choices"], list) or not rec["choices"]
                                 or not all(isinstance(c, str) and c.strip() for c in rec["choices"])):
            raise DataError(f'{where} "choices" must be a non-empty list of strings')
        extract = rec.get("extract", "auto")
        if not isinstance(extract, str) or extract not in EXTRACT_METHODS:
            raise DataError(f'{where} "extract" {extract!r} must be one of {", ".join(EXTRACT_METHODS)}')
        if "pattern" in rec:
            if not isinstance(rec["pattern"], str) or not rec["pattern"]:
                raise DataError(f'{where} "pattern" must be a regular expression (a non-empty string), '
                                f'got {rec["pattern"]!r}')
            try:
                re.compile(rec["pattern"])
            except re.error as e:
                raise DataError(f'{where} invalid regular expression {rec["pattern"]!r}: {e}') from None
        if extract in ("number", "last-number") and canonical_number(answer) is None:
            raise DataError(f'{where} answer {answer!r} is not a number; use "extract": "exact", "choice" or '
                            f'"regex" for it')
        records.append({**rec, "line": n})
    if not records:
        raise DataError(f'task file {path} holds no records; write one {{"prompt": ..., "answer": ...}} object '
                        f"per line")
    return records


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound also near 0 and 1 and for small n)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def task_accuracy(model, tokenizer, records: list[dict], config: SamplingConfig | None = None,
                  extract: str = TaskConfig.extract, pattern: str | None = None,
                  batch_size: int = TaskConfig.batch_size, progress: Progress | None = None,
                  chains: int = 1, marker: str | None = None) -> dict:
    """Exact-match accuracy of the completions of `records` (see load_tasks), with a 95% CI. `config` None:
    TaskConfig's greedy completions. With `chains` K > 1 (self-consistency; a temperature above 0), K sampled
    completions per record, the prediction the majority of their answers (prompting.majority_vote). With a
    `marker`, answers are read after its last occurrence only (prompting.extract_answer)."""
    task = TaskConfig.from_dict({"extract": extract, "pattern": pattern, "batch_size": batch_size})  # checked
    if isinstance(chains, bool) or not isinstance(chains, int) or chains < 1:
        raise ConfigError(f"self-consistency needs 1 or more chains per record, got {chains!r}")
    config = config or task.sampling
    if chains > 1 and config.greedy:
        raise ConfigError(f"self-consistency with {chains} chains at temperature 0: every chain would be the same; "
                          f"give a temperature above 0 (e.g. 0.7)")
    methods = [resolve_method(r, extract) for r in records]
    for r, m in zip(records, methods):  # check every record before generating anything
        if m == "regex":
            _compile(r.get("pattern", pattern))
        elif m in ("number", "last-number") and canonical_number(r["answer"]) is None:
            raise DataError(f"line {r.get('line', '?')}: answer {r['answer']!r} is not a number; "
                            f"use --extract exact, choice or regex for it")
    rows = []
    start = time.perf_counter()
    new_tokens = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        outs = generate(model, tokenizer, [r["prompt"] for r in chunk], config, num_samples=chains)
        for k, (r, m) in enumerate(zip(chunk, methods[i:i + batch_size])):
            gens = outs[k * chains:(k + 1) * chains]
            answers = [extract_answer(g.text, m, r.get("pattern", pattern), r.get("choices"), marker) for g in gens]
            predicted, votes = majority_vote(answers) if chains > 1 else (answers[0], None)
            row = {"line": r["line"], "prompt": r["prompt"], "answer": r["answer"], "completion": gens[0].text,
                   "extract": m, "predicted": predicted, "correct": is_correct(predicted, r, m)}
            if chains > 1:
                row.update(completions=[g.text for g in gens], votes=votes)
            rows.append(row)
            new_tokens += sum(g.new_tokens for g in gens)
        report(progress, "task", len(rows), len(records), unit="records")
    seconds = time.perf_counter() - start
    correct = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(correct, len(rows))
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows), "ci95": [lo, hi],
            "ci_method": "wilson", "extract": extract, "answer_marker": marker, "chains": chains,
            "new_tokens": new_tokens, "seconds": seconds,
            "sampling": config.to_dict(), "records": rows}


def task_accuracy_of_file(model_dir: str | os.PathLike | None, path: str | os.PathLike, cfg: TaskConfig | None = None,
                          progress: Progress | None = None, prompt: PromptConfig | None = None) -> dict:
    """`task_accuracy` of a model directory (None: the bundled default) on a JSONL task file. With `prompt`
    (few-shot, chain-of-thought, an instruction: prompting.build_prompt), each record's prompt is the query of a
    prompt built to fit the model's context with cfg.max_new_tokens left; the result's "prompt" says how."""
    cfg = cfg or TaskConfig()
    records, shots = _checked_tasks(path, cfg, prompt)
    model, tok, _ = load_for_inference(model_dir, cfg.compute_dtype, cfg.device, progress=progress,
                                       adapter=cfg.adapter, force_base=cfg.force_base,
                                       engine=cfg.engine)
    result = _task_run(model, tok, records, cfg, prompt, shots, progress)
    return {"model": str(model_dir) if model_dir is not None else "default", "file": str(path), **result}


def _checked_tasks(path, cfg: TaskConfig, prompt: PromptConfig | None) -> tuple[list[dict], list | None]:
    """The task file's records, checked against --extract and --pattern, and the shots: before the model loads."""
    records = load_tasks(path)
    shots = load_shots(prompt.shots) if prompt is not None and prompt.shots else None
    for r in records:
        method, where = resolve_method(r, cfg.extract), f"task file {path}:{r['line']}:"
        if method == "regex" and not r.get("pattern", cfg.pattern):
            raise ConfigError(f'{where} regex extraction needs a pattern (--pattern, or "pattern" in the record)')
        if method == "regex":
            _compile(r.get("pattern", cfg.pattern))
        elif method in ("number", "last-number") and canonical_number(r["answer"]) is None:
            raise DataError(f"{where} answer {r['answer']!r} is not a number; use --extract exact, choice or regex "
                            f"for it")
    return records, shots


def _task_run(model, tok, records, cfg: TaskConfig, prompt: PromptConfig | None, shots, progress) -> dict:
    built = None
    if prompt is not None:
        built = [build_prompt(r["prompt"], prompt, shots, tok, model.config.block_size, cfg.max_new_tokens)
                 for r in records]
        records = [{**r, "prompt": b.text} for r, b in zip(records, built)]
    result = task_accuracy(model, tok, records, cfg.sampling, cfg.extract, cfg.pattern, cfg.batch_size, progress,
                           cfg.self_consistency, cfg.answer_marker)
    if built is not None:
        used = [b.shots_used for b in built]
        result["prompt"] = {**prompt.to_dict(), "shots_used": [min(used), max(used)],
                            "shots_dropped": max(b.shots_dropped for b in built)}
    return result


STRATEGIES = ("direct", "cot", "self-consistency")
SC_CHAINS, SC_TEMPERATURE = 5, 0.7  # self-consistency's chains and temperature when --self-consistency/--temperature
# leave them at 1 and 0


def strategy_configs(name: str, cfg: TaskConfig, prompt: PromptConfig) -> tuple[TaskConfig, PromptConfig]:
    """A prompt strategy of --compare as configs: direct (no chain of thought, one greedy chain), cot (the trigger
    and the shots' steps, one greedy chain), self-consistency (cot, K sampled chains, the majority answer)."""
    if name not in STRATEGIES:
        raise ConfigError(f"--compare strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    if name == "self-consistency":
        k = cfg.self_consistency if cfg.self_consistency > 1 else SC_CHAINS
        t = cfg.temperature if cfg.temperature > 0 else SC_TEMPERATURE
        return cfg.replace(self_consistency=k, temperature=t), prompt.replace(cot=True)
    return cfg.replace(self_consistency=1, temperature=0.0), prompt.replace(cot=name == "cot")


def paired_difference(a: list[bool], b: list[bool], z: float = 1.959964) -> dict:
    """B's accuracy minus A's on the same items: the difference, its 95% interval (Wald, for paired proportions)
    and McNemar's exact two-sided p-value over the discordant items."""
    n = len(a)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    d = (only_b - only_a) / n
    se = math.sqrt(max(0.0, only_b + only_a - (only_b - only_a) ** 2 / n)) / n
    m = only_a + only_b
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m if m else 1.0
    return {"difference": d, "ci95": [d - z * se, d + z * se], "only_a": only_a, "only_b": only_b,
            "mcnemar_p": min(1.0, 2 * tail)}


def compare_strategies(model_dir, path, cfg: TaskConfig, prompt: PromptConfig, strategies: Sequence[str],
                       progress: Progress | None = None) -> dict:
    """Every strategy on the same records with one model: each one's accuracy, and each one's paired difference
    from the first (paired_difference)."""
    if len(strategies) < 2:
        raise ConfigError("--compare needs two strategies or more (direct, cot, self-consistency)")
    configs = [strategy_configs(name, cfg, prompt) for name in strategies]
    records, shots = _checked_tasks(path, cfg, prompt)
    model, tok, _ = load_for_inference(model_dir, cfg.compute_dtype, cfg.device, progress=progress,
                                       adapter=cfg.adapter, force_base=cfg.force_base,
                                       engine=cfg.engine)
    runs = [_task_run(model, tok, records, c, p, shots, progress) for c, p in configs]
    hits = [[r["correct"] for r in run["records"]] for run in runs]
    rows = [{"strategy": name, "chains": run["chains"], "temperature": c.temperature, **{k: run[k] for k in (
        "accuracy", "correct", "total", "ci95")}} for name, run, (c, _) in zip(strategies, runs, configs)]
    paired = [{"a": strategies[0], "b": name, **paired_difference(hits[0], h)}
              for name, h in zip(strategies[1:], hits[1:])]
    return {"model": str(model_dir) if model_dir is not None else "default", "file": str(path),
            "strategies": rows, "paired": paired, "runs": runs}

