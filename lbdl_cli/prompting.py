"""Prompts (LBDL 7.1, 8.1): few-shot templates, chain-of-thought, answer extraction, the majority vote.

A format is a template with {input} and {output}: "qa" is `Q: {input} A: {output}`, "io" is LBDL
figure 7.1's `I: {input}, O: {output},`; any other string with both fields is a format of its own.
Shots are rendered in full, the query up to its output:

    Q: Paul has 84 shells. He gives Sam 39 shells. How many shells remain? A: 45
    Q: Mira has 57 books. She gives Ada 19 books. How many books does Mira have? A:

With `cot`, the shots show their step-by-step completions and the query ends with the trigger
(`... A: Let's proceed step by step:`). A text already in the format (data/tasks prompts are
`Q: ... A:`) is taken without its wrapping, so task records serve as shots and as queries.

    from lbdl_cli.prompting import PromptConfig, build_prompt, load_shots, extract_answer, majority_vote
    cfg = PromptConfig(shots="data/tasks/arithmetic-train.jsonl", n_shots=4, cot=True)
    prompt = build_prompt(record["prompt"], cfg, load_shots(cfg.shots), tok, context=256, max_new_tokens=64)
    prompt.text, prompt.shots_used, prompt.shots_dropped
    answer, votes = majority_vote([extract_answer(t, "last-number") for t in chains])

Torch-free, layer 6.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Sequence

from .config import MAX_SEED, Config, setting
from .errors import ConfigError, DataError
from .files import read_jsonl, read_text

FORMATS = {"qa": "Q: {input} A: {output}", "io": "I: {input}, O: {output},"}
SEPARATORS = {"io": " "}  # between shots and before the query; "\n" for every other format
DEFAULT_TRIGGER = "Let's proceed step by step:"
INPUT_KEYS, OUTPUT_KEYS, COT_KEYS = ("input", "prompt"), ("output", "answer", "completion"), ("cot", "cot_completion")

EXTRACT_METHODS = ("auto", "exact", "number", "last-number", "choice", "regex")
DEFAULT_CHOICES = ("A", "B", "C", "D", "E")
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptConfig(Config):
    """How a query becomes a prompt: the format, the shots and their selection, an instruction, chain-of-thought."""

    format: str = setting("qa", "qa (Q: ... A: ...) | io (I: ..., O: ...,) | a format string with {input} and "
                                "{output}.", metavar="FORMAT")
    shots: str | None = setting(None, "Few-shot examples: a JSONL file of {\"input\", \"output\"} records (or "
                                      "prompt/answer/completion, + cot) or a TOML file of [[shots]] tables.",
                                metavar="FILE")
    n_shots: int = setting(4, "Shots drawn from --shots.", low=0, high=1 << 20)
    seed: int = setting(0, "Seed of the shots' selection.", low=0, high=MAX_SEED)
    instruction: str | None = setting(None, "Text before the shots (e.g. who wrote the answers).", metavar="TEXT")
    cot: bool = setting(False, "Chain-of-thought: the shots show their steps and the query ends with --trigger.")
    trigger: str = setting(DEFAULT_TRIGGER, "What starts a chain-of-thought answer.", metavar="TEXT")
    separator: str | None = setting(None, "Between shots (default: a space for io, a line break otherwise).",
                                    metavar="TEXT")

    def __post_init__(self):
        super().__post_init__()
        if self.shots is not None and self.n_shots < 1:
            raise ConfigError(f"prompt config: n_shots {self.n_shots} with a shots file; use --n-shots 1 or more, "
                              f"or leave out --shots for a zero-shot prompt")
        template_parts(self.format)  # a format string is checked here
        if self.cot and not self.trigger.strip():
            raise ConfigError(f"prompt config: the chain-of-thought trigger is empty; give one (default "
                              f"{DEFAULT_TRIGGER!r})")

    @property
    def template(self) -> str:
        return FORMATS.get(self.format, self.format)

    @property
    def sep(self) -> str:
        return self.separator if self.separator is not None else SEPARATORS.get(self.format, "\n")


def template_parts(fmt: str) -> tuple[str, str, str]:
    """(head, middle, tail) of a format: the text before {input}, between {input} and {output}, after {output}."""
    template = FORMATS.get(fmt, fmt)
    for field in ("{input}", "{output}"):
        if template.count(field) != 1:
            raise ConfigError(f"prompt config: format {fmt!r} must hold {field} once (it holds it "
                              f"{template.count(field)} times); use qa, io or a string like 'Q: {{input}} A: "
                              f"{{output}}'")
    head, rest = template.split("{input}")
    if "{output}" not in rest:
        raise ConfigError(f"prompt config: format {fmt!r} puts {{output}} before {{input}}; the input comes first")
    middle, tail = rest.split("{output}")
    return head, middle, tail


# --- shots -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One worked example: its input, its direct output, its step-by-step output (None without one), and where
    it was read (`shots file x.jsonl:3`) for errors."""

    input: str
    output: str
    cot: str | None = None
    where: str = "shot"


def _text(rec: dict, keys: Sequence[str], numbers: bool = False):
    """The first of `keys` present in `rec` as (key, stripped text); (None, None) when none is; (key, None) when
    the value is not a non-empty text (or number, with `numbers`)."""
    key = next((k for k in keys if k in rec), None)
    if key is None:
        return None, None
    v = rec[key]
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        v = str(v)
    return key, (v.strip() or None) if isinstance(v, str) else None


def shot_of(rec, where: str) -> Shot:
    """A Shot from one record, or a DataError naming `where`."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a table of input and output, got {rec!r}")
    key, text = _text(rec, INPUT_KEYS)
    if text is None:
        raise DataError(f'{where}: "{key}" must be a non-empty string' if key else
                        f'{where}: no "input" (or "prompt") text; write {{"input": ..., "output": ...}}')
    key, out = _text(rec, OUTPUT_KEYS, numbers=True)
    if out is None:
        raise DataError(f'{where}: "{key}" must be a non-empty string or a number' if key else
                        f'{where}: no "output" (or "answer", "completion"); write {{"input": ..., "output": ...}}')
    key, cot = _text(rec, COT_KEYS)
    if key is not None and cot is None:
        raise DataError(f'{where}: "{key}" must be a non-empty string (the step-by-step answer)')
    return Shot(text, out, cot, where)


def load_shots(path: str | os.PathLike) -> list[Shot]:
    """The shots of a JSONL file (one record a line) or a .toml file ([[shots]] tables); errors name file:line."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        shots = _toml_shots(path)
    else:
        shots = [shot_of(rec, f"shots file {path}:{n}") for n, rec in read_jsonl(path, "shots file")]
    if not shots:
        raise DataError(f"shots file {path} holds no shots; write one {{\"input\": ..., \"output\": ...}} per line "
                        f"(or [[shots]] tables in a .toml file)")
    return shots


def _toml_shots(path: Path) -> list[Shot]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(read_text(path, "shots file"))
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"shots file {path} is not valid TOML ({e}); fix it") from None
    tables = data.get("shots")
    if not isinstance(tables, list) or set(data) - {"shots"}:
        raise DataError(f"shots file {path}: expected only [[shots]] tables (input = ..., output = ...)")
    return [shot_of(rec, f"shots file {path}: shot {i}") for i, rec in enumerate(tables, 1)]


def select_shots(shots: Sequence[Shot], cfg: PromptConfig, query: str | None = None) -> list[Shot]:
    """`cfg.n_shots` of `shots`, drawn without replacement by `cfg.seed` (the same seed, the same shots in the
    same order). A shot asking `query` itself is left out of the draw, so a question never shows its own answer
    (a task file that is also its own shots file)."""
    pool = list(shots)
    if query is not None:
        asked = unwrap(query, cfg)
        pool = [s for s in pool if unwrap(s.input, cfg) != asked]
    if cfg.n_shots > len(pool):
        own = " other than the query itself" if len(pool) < len(shots) else ""
        raise ConfigError(f"{cfg.n_shots} shots requested but the shots file holds {len(pool)}{own}; use "
                          f"--n-shots {len(pool)} or less")
    return random.Random(cfg.seed).sample(pool, cfg.n_shots)


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """An assembled prompt: its text, the shots in it, the shots left out to fit the context, its tokens (None
    without a tokenizer)."""

    text: str
    shots_used: int
    shots_dropped: int = 0
    tokens: int | None = None


def unwrap(text: str, cfg: PromptConfig) -> str:
    """`text` without the format's wrapping when it has it ("Q: 2 + 2? A:" -> "2 + 2?" in qa); else stripped."""
    head, middle, _ = template_parts(cfg.format)
    text, end = text.strip(), middle.rstrip()
    if head.strip() and end.strip() and text.startswith(head) and text.endswith(end) \
            and len(text) >= len(head) + len(end):
        text = text[len(head):len(text) - len(end)].strip()
    return text


def render_shot(shot: Shot, cfg: PromptConfig) -> str:
    """One worked example in the format (with cot, its step-by-step answer beginning with the trigger)."""
    head, middle, tail = template_parts(cfg.format)
    output = shot.output
    if cfg.cot:
        if shot.cot is None:
            raise DataError(f'{shot.where}: no "cot" (or "cot_completion") step-by-step answer, which --cot needs')
        output = shot.cot if shot.cot.startswith(cfg.trigger) else f"{cfg.trigger} {shot.cot}"
    return f"{head}{unwrap(shot.input, cfg)}{middle}{output}{tail}"


def render_query(query: str, cfg: PromptConfig) -> str:
    """The query in the format, up to its output (with cot: up to and including the trigger)."""
    head, middle, _ = template_parts(cfg.format)
    text = unwrap(query, cfg)
    if not text:
        raise ConfigError("the query is empty; give a question for the prompt to end with")
    return f"{head}{text}{middle}{cfg.trigger}" if cfg.cot else f"{head}{text}{middle.rstrip()}"


def assemble(query: str, cfg: PromptConfig, shots: Sequence[Shot]) -> str:
    """The prompt's text: the instruction (and a line break), the shots, the query, joined by the separator."""
    parts = [render_shot(s, cfg) for s in shots] + [render_query(query, cfg)]
    text = cfg.sep.join(parts)
    return f"{cfg.instruction.strip()}\n{text}" if cfg.instruction and cfg.instruction.strip() else text


def build_prompt(query: str, cfg: PromptConfig | None = None, shots: Sequence[Shot] | None = None, tokenizer=None,
                 context: int | None = None, max_new_tokens: int = 0) -> Prompt:
    """The prompt of `query`: `cfg.n_shots` of `shots` (None: loaded from cfg.shots; without either, zero-shot)
    selected by cfg.seed (never `query` itself), in the format. With a tokenizer and a context, whole shots are
    dropped from the end of the selection until the prompt and `max_new_tokens` fit; ConfigError when even zero
    shots do not."""
    cfg = cfg or PromptConfig()
    if shots is None and cfg.shots is not None:
        shots = load_shots(cfg.shots)
    chosen = select_shots(shots, cfg, query) if shots else []
    if tokenizer is None or context is None:
        return Prompt(assemble(query, cfg, chosen), len(chosen))
    budget = context - max_new_tokens
    if budget < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of "
                          f"{context}; use --max-new-tokens {context - 1} or less")
    for k in range(len(chosen), -1, -1):
        text = assemble(query, cfg, chosen[:k])
        n = len(tokenizer.encode(text, allow_special=True))
        if n <= budget:
            return Prompt(text, k, len(chosen) - k, n)
    raise ConfigError(f"the prompt without shots is {n} tokens; the context of {context} leaves {budget} after "
                      f"{max_new_tokens} new tokens; shorten the query or the instruction, or lower "
                      f"--max-new-tokens")


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """(the most frequent answer, {answer: votes} in order of first appearance); None answers do not vote,
    a tie goes to the answer that appeared first, no answers at all give (None, {})."""
    votes: dict[str, int] = {}
    for a in answers:
        if a is not None:
            votes[a] = votes.get(a, 0) + 1
    best = None
    for a, n in votes.items():
        if best is None or n > votes[best]:
            best = a
    return best, votes


# --- answer extraction (shared with `eval task`) -------------------------------------------------


def canonical_number(text) -> str | None:
    """A number written as text ("1,234.50", "-7") in one canonical form ("1234.5", "-7"); else None."""
    try:
        d = Decimal(str(text).strip().replace(",", ""))
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    return format(d.quantize(Decimal(1)) if d == d.to_integral_value() else d, "f")


def _compile(pattern: str | None) -> re.Pattern:
    if not pattern:
        raise ConfigError("regex extraction needs a pattern (--pattern, or \"pattern\" in the record)")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"invalid regular expression {pattern!r}: {e}") from None


def resolve_method(record: dict, method: str) -> str:
    method = record.get("extract", method)
    if method != "auto":
        return method
    if "choices" in record:
        return "choice"
    if canonical_number(record["answer"]) is not None:
        return "number"
    return "exact"


def extract_answer(text: str, method: str, pattern: str | None = None,
                   choices: Sequence[str] | None = None, marker: str | None = None) -> str | None:
    """The answer a completion gives, by `method`; None when it gives none.

    exact: the first line, stripped. number / last-number: the first / last
    number (commas allowed), canonical. choice: the first of `choices` that
    stands alone as a word (letters A-E by default). regex: the first match's
    group 1 (or the whole match). With a `marker` ("The answer is"), only the
    text after its last occurrence is read, and a completion without it gives
    none (a chain that never reached its answer does not vote).
    """
    if marker:
        at = text.rfind(marker)
        if at < 0:
            return None
        text = text[at + len(marker):]
    if method == "exact":
        line = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
        return line or None
    if method in ("number", "last-number"):
        found = NUMBER_RE.findall(text)
        if not found:
            return None
        return canonical_number(found[0] if method == "number" else found[-1])
    if method == "choice":
        labels = [c.strip() for c in (choices or DEFAULT_CHOICES)]
        alternation = "|".join(re.escape(c) for c in sorted(labels, key=len, reverse=True))
        flags = 0 if all(len(c) == 1 for c in labels) else re.IGNORECASE
        m = re.search(rf"(?<!\w)({alternation})(?!\w)", text, flags)
        if not m:
            return None
        return next(c for c in labels if c.lower() == m.group(1).lower()) if flags else m.group(1)
    if method == "regex":
        m = _compile(pattern).search(text)
        if not m:
            return None
        return (m.group(1) if m.re.groups else m.group(0)).strip()
    raise ConfigError(f"unknown extraction {method!r}; choose one of {', '.join(EXTRACT_METHODS)}")


def is_correct(predicted: str | None, record: dict, method: str) -> bool:
    if predicted is None:
        return False
    answer = record["answer"]
    if method in ("number", "last-number"):
        expected = canonical_number(answer)
        if expected is None:
            raise DataError(f"line {record.get('line', '?')}: answer {answer!r} is not a number; "
                            f"use --extract exact, choice or regex for it")
        return predicted == expected
    if method == "choice":
        return predicted.lower() == str(answer).strip().lower()
    return predicted == str(answer).strip()


# --- a prompted generation: the prompt built, K chains, their answers and the vote ------------------------------


@dataclass(frozen=True)
class ChainConfig(Config):
    """`lbdl generate` with a built prompt: how many chains, how their answer is read, what is shown."""

    self_consistency: int = setting(1, "Self-consistency: sample K chains (sharing the prompt's prefill) and take "
                                       "the majority of their answers; needs a temperature above 0.", low=1,
                                    high=1 << 10, metavar="K")
    answer: str | None = setting(None, "Read an answer from each chain: number (the last number), choice (a letter "
                                       "A-E) or a regular expression (group 1).", metavar="HOW")
    answer_marker: str | None = setting(None, "Read the answer only after the last occurrence of this text (e.g. "
                                              "'The answer is'); a chain without it gives no answer.", metavar="TEXT")
    show_prompt: bool = setting(False, "Print the assembled prompt first.")

    def __post_init__(self):
        super().__post_init__()
        if self.answer not in (None, "number", "choice"):
            _compile(self.answer)  # a bad regex is refused with its error

    @property
    def method(self) -> tuple[str, str | None]:
        """(extract_answer's method, its pattern) for --answer (number: the last number, as a chain ends with it)."""
        if self.answer in (None, "number"):
            return "last-number", None
        return ("choice", None) if self.answer == "choice" else ("regex", self.answer)


def check_chains(chains: ChainConfig, sampling) -> None:
    """Self-consistency needs sampled chains: K > 1 at temperature 0 is refused (the chains would be the same)."""
    k = chains.self_consistency
    if k > 1 and sampling.greedy:
        raise ConfigError(f"self-consistency with {k} chains at temperature 0: every chain would be the same; give "
                          f"--temperature above 0 (e.g. 0.7)")


def sample_chains(model, tok, text: str, sampling, chains: ChainConfig, on_text=None, progress=None) -> dict:
    """`text` continued in `chains.self_consistency` chains (sharing one prefill), each chain's answer read (with
    --answer, --answer-marker or K > 1) and the majority taken. Streams through `on_text` (the prompt first) when
    there is one chain. Returns the sampling, the chains, their answers, the answer and the votes."""
    from .progress import report
    from .sample import generate

    k = chains.self_consistency
    stream = on_text is not None and k == 1
    if stream:
        on_text(text)
    results = generate(model, tok, [text], sampling, num_samples=k,
                       on_token=(lambda index, new: on_text(new)) if stream else None,
                       on_notice=lambda m: report(progress, "generate", message=m, level="warning"))
    method, pattern = chains.method
    answers = ([extract_answer(g.text, method, pattern, marker=chains.answer_marker) for g in results]
               if chains.answer or chains.answer_marker or k > 1 else [])
    answer, votes = majority_vote(answers) if answers else (None, {})
    return {"sampling": sampling.to_dict(), "chains": k, "results": [g.to_dict() for g in results],
            "answers": answers, "answer": answer, "votes": votes}


def prompted_generation(model_dir, query: str, prompt: PromptConfig, chains: ChainConfig, gen, on_text=None,
                        progress=None) -> dict:
    """`query` as a built prompt (build_prompt, fitted to the model's context with gen.max_new_tokens left),
    continued in `chains.self_consistency` chains by `gen` (a GenerateConfig): sample_chains. Returns the prompt,
    its shots, the chains, their answers, the answer and the votes."""
    from .sample import load_for_inference

    check_chains(chains, gen.sampling)
    shots = load_shots(prompt.shots) if prompt.shots else None  # a bad shots file before the model loads
    model, tok, _ = load_for_inference(model_dir, gen.compute_dtype, gen.device, progress=progress,
                                       adapter=gen.adapter, force_base=gen.force_base,
                                       engine=gen.engine)
    built = build_prompt(query, prompt, shots, tok, model.config.block_size, gen.sampling.max_new_tokens)
    return {"model": str(model_dir) if model_dir is not None else "default", "prompt": built.text,
            "shots_used": built.shots_used, "shots_dropped": built.shots_dropped,
            **sample_chains(model, tok, built.text, gen.sampling, chains, on_text, progress)}
