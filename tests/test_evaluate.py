"""Perplexity, bits per byte and task accuracy: known answers, the transformers oracle, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT, assert_round_trips, imported_hf_model, tiny_model
from test_sample import ScriptedLM

from lbdl_cli.errors import ConfigError, DataError
from lbdl_cli.evaluate import (
    PerplexityConfig,
    TaskConfig,
    canonical_number,
    extract_answer,
    is_correct,
    load_tasks,
    perplexity,
    task_accuracy,
    task_accuracy_of_file,
    token_byte_lengths,
    wilson_interval,
    windows,
)
from lbdl_cli.progress import collect
from lbdl_cli.sample import SamplingConfig, generate, load_for_inference


@torch.no_grad()
def direct_nlls(model_fn, ids, ctx, stride=None):
    """Per-token NLLs by the book: each window through a full forward pass, one token at a time.

    llama.cpp: window i holds tokens [i*ctx, (i+1)*ctx); the targets at window positions
    ctx/2 + 1 .. ctx - 1 are scored. Sliding: window starts every `stride` tokens, each
    scoring the targets not scored before (the last window ends at the last token).
    """
    n, out = len(ids), []
    if stride is None:
        plan = [(s, list(range(s + ctx // 2 + 1, s + ctx))) for s in range(0, n - ctx + 1, ctx)]
    else:
        plan, scored, begin = [], 0, 0
        while True:
            end = min(begin + ctx, n)
            start = end - ctx
            targets = [t for t in range(max(scored, start + 1), end)]
            plan.append((start, targets))
            scored = end
            if end == n:
                break
            begin += stride
    for start, targets in plan:
        x = torch.tensor([ids[start:start + ctx]])
        logp = model_fn(x)[0].float().log_softmax(-1)  # (ctx, V)
        for t in targets:
            out.append(-float(logp[t - start - 1, ids[t]]))
    return out


def ppl_of(nlls):
    return math.exp(sum(nlls) / len(nlls))


# --- windows ------------------------------------------------------------------------------------


def test_windows_known_answers():
    assert windows(10, 4) == [(0, 2), (4, 2)]  # llama.cpp: 2 whole windows, the remainder dropped
    assert windows(10, 4, stride=2) == [(0, 0), (2, 1), (4, 1), (6, 1)]
    assert windows(9, 4, stride=3) == [(0, 0), (3, 0), (5, 1)]  # the last window ends at the last token


@pytest.mark.parametrize("n, ctx, stride", [(50, 8, 1), (50, 8, 3), (50, 8, 7), (51, 16, 5), (16, 16, 4)])
def test_sliding_windows_score_every_token_after_the_first_exactly_once(n, ctx, stride):
    scored = []
    for start, first in windows(n, ctx, stride):
        assert 0 <= start and start + ctx <= n
        scored += list(range(start + first + 1, start + ctx))
    assert sorted(scored) == list(range(1, n))


# --- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    PerplexityConfig(), PerplexityConfig(context=64, stride=16, batch_size=2, compute_dtype="bfloat16", device="cpu"),
    TaskConfig(), TaskConfig(extract="regex", pattern=r"is (\d+)", max_new_tokens=4, stop=(r"\n\n", "Q:"),
                             batch_size=3, compute_dtype="float32", device="cpu"),
])
def test_eval_configs_round_trip(config):
    assert_round_trips(config)


def test_eval_configs_check_their_ranges():
    with pytest.raises(ConfigError, match="stride 17 is larger than the context 16"):
        PerplexityConfig(context=16, stride=17)
    with pytest.raises(ConfigError, match="context must be in"):
        PerplexityConfig(context=2)
    with pytest.raises(ConfigError, match="batch_size"):
        TaskConfig(batch_size=0)
    with pytest.raises(ConfigError, match="extract must be one of.*'vibes'"):
        TaskConfig(extract="vibes")


def test_task_config_builds_greedy_sampling_with_typed_stops():
    assert TaskConfig().sampling == SamplingConfig(temperature=0.0, max_new_tokens=32, stop=("\n",), seed=0)
    sampling = TaskConfig(max_new_tokens=5, stop=(r"\n\n", "Q:")).sampling
    assert sampling.greedy and sampling.max_new_tokens == 5 and sampling.stop == ("\n\n", "Q:")
    assert TaskConfig(temperature=0.7, self_consistency=5, seed=3).sampling.temperature == 0.7
    with pytest.raises(ConfigError, match="self-consistency with 5 chains at temperature 0: every chain would be"):
        TaskConfig(self_consistency=5)


# --- perplexity: known answers and the direct loop -------------------------------------------------


def test_uniform_model_has_perplexity_v_and_bits_per_byte_known():
    V = 400
    model = ScriptedLM([0], prompt_len=0, vocab=V, block_size=64)
    model.forward = lambda idx, cache=None, logits_to_keep=0: torch.zeros(idx.shape[0], logits_to_keep or idx.shape[1],
                                                                          V)
    ids = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0))
    token_bytes = torch.arange(V) % 4 + 1
    r = perplexity(model, ids, ctx=32, token_bytes=token_bytes)
    assert r["perplexity"] == pytest.approx(V, rel=1e-6) and r["nll"] == pytest.approx(math.log(V))
    assert r["std_error"] == pytest.approx(0.0, abs=1e-9)
    assert r["windows"] == 9 and r["tokens"] == 9 * 15  # 300 // 32 windows, 32 - 1 - 16 scored in each
    scored = torch.cat([ids[s + 17:s + 32] for s, _ in windows(300, 32)])
    assert r["bytes"] == int(token_bytes[scored].sum())
    assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log(V) / math.log(2) / r["bytes"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("stride", [None, 5, 16])
def test_perplexity_equals_the_direct_loop_for_any_batch_size(family, stride):
    model = tiny_model(family=family)  # block_size 32
    ids = torch.randint(0, 97, (203,), generator=torch.Generator().manual_seed(1)).tolist()
    nlls = direct_nlls(model, ids, 16, stride)
    mean = sum(nlls) / len(nlls)
    var = sum((v - mean) ** 2 for v in nlls) / len(nlls)
    for batch_size in (1, 3, 64):
        r = perplexity(model, ids, ctx=16, stride=stride, batch_size=batch_size)
        assert r["tokens"] == len(nlls)
        assert r["perplexity"] == pytest.approx(ppl_of(nlls), rel=1e-5)
        assert r["nll"] == pytest.approx(mean, rel=1e-5)
        assert r["std_error"] == pytest.approx(r["perplexity"] * math.sqrt(var / (len(nlls) - 1)), rel=1e-4)
        assert r["convention"] == ("llama.cpp" if stride is None else "sliding")
        assert r["tokens_evaluated"] == r["windows"] * 16
        assert r["tokens_per_s"] == pytest.approx(r["tokens_evaluated"] / r["seconds"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_perplexity_of_an_imported_model_equals_transformers_on_the_same_windows(arch, tmp_path):
    hf, model = imported_hf_model(arch, tmp_path, noise=0.1)
    ids = torch.randint(0, 113, (500,), generator=torch.Generator().manual_seed(2)).tolist()
    for stride in (None, 24):
        theirs = ppl_of(direct_nlls(lambda x: hf(x).logits, ids, 64, stride))
        ours = perplexity(model, ids, ctx=64, stride=stride, batch_size=4)
        assert ours["perplexity"] == pytest.approx(theirs, rel=1e-5)


def test_perplexity_reports_windows_done_up_to_the_total():
    model = tiny_model()
    ids = torch.randint(0, 97, (203,), generator=torch.Generator().manual_seed(4))
    events = []
    r = perplexity(model, ids, ctx=16, stride=5, batch_size=3, progress=collect(events))
    assert {(e.stage, e.unit, e.total) for e in events} == {("perplexity", "windows", r["windows"])}
    done = [e.done for e in events]
    assert done == sorted(done) and done[-1] == r["windows"] and len(events) == math.ceil(r["windows"] / 3)


def test_bfloat16_perplexity_is_close_to_float32():
    model = tiny_model(family="llama")
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(3))
    full = perplexity(model, ids, ctx=32)["perplexity"]
    half = perplexity(model.to(torch.bfloat16), ids, ctx=32)["perplexity"]
    assert half == pytest.approx(full, rel=0.02)


def test_perplexity_refuses_bad_windows():
    model = tiny_model()
    ids = list(range(50))
    with pytest.raises(DataError, match="has 20 tokens.*needs at least 32 tokens"):
        perplexity(model, ids[:20], ctx=32)
    with pytest.raises(ConfigError, match="longer than the model's"):
        perplexity(model, ids, ctx=64)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, ids, ctx=16, stride=17)
    with pytest.raises(ConfigError, match="context must be in"):
        perplexity(model, ids, ctx=2)


def test_file_perplexity_bits_per_byte_counts_the_scored_bytes(model_dir, tok, tmp_path):
    from lbdl_cli.evaluate import PerplexityConfig, perplexity_of_file

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[5000:9000]
    (tmp_path / "t.txt").write_text(text)
    lengths = token_byte_lengths(tok)
    ids = tok.encode(text)
    assert sum(lengths[i] for i in ids) == len(text.encode())  # exact: byte counts per token add up
    r = perplexity_of_file(model_dir, tmp_path / "t.txt", PerplexityConfig(context=64, stride=64))
    scored = {t for s, first in windows(len(ids), 64, 64) for t in range(s + first + 1, s + 64)}
    assert len(scored) == r["tokens"] < len(ids)  # a window's first token has no context: not scored
    assert r["bytes"] == sum(lengths[ids[t]] for t in scored)
    assert r["bits_per_byte"] == pytest.approx(r["nll"] * r["tokens"] / math.log(2) / r["bytes"])
    assert r["file_tokens"] == len(ids)


# --- task accuracy ----------------------------------------------------------------------------------


def test_answer_extraction_known_answers():
    assert extract_answer("The answer is 1,234.50 apples, not 7", "number") == "1234.5"
    assert extract_answer("Gina has 105 beans ... So there are 29 beans left.", "last-number") == "29"
    assert extract_answer("no digits here", "number") is None
    assert extract_answer("I think (B) is right, not A", "choice") == "B"
    assert extract_answer("a banana", "choice") is None  # lower-case letters are words, not choices
    assert extract_answer("Surely PARIS.", "choice", choices=["London", "Paris"]) == "Paris"
    assert extract_answer("answer: foo-bar!", "regex", pattern=r"answer: ([\w-]+)") == "foo-bar"
    assert extract_answer("  Paris\nand more", "exact") == "Paris"
    # after an answer marker: only the text after its last occurrence; none without it
    chain = "He has 45 left, then 88 now. The answer is 88 marbles, he had 2 bags."
    assert extract_answer(chain, "last-number") == "2"
    assert extract_answer(chain, "number", marker="The answer is") == "88"
    assert extract_answer("The answer is 3. No: the answer is 5. The answer is 7", "number",
                          marker="The answer is") == "7"
    assert extract_answer("45 left, 88 now", "last-number", marker="The answer is") is None
    assert extract_answer("Answer: (C) surely", "choice", marker="Answer:") == "C"
    assert canonical_number("29.0") == canonical_number(29) == "29" and canonical_number("x") is None


def test_is_correct_compares_by_method():
    assert is_correct("29", {"answer": 29}, "number")
    assert is_correct("29", {"answer": "29.00"}, "number")
    assert not is_correct("28", {"answer": 29}, "number")
    assert is_correct("b", {"answer": "B"}, "choice")
    assert not is_correct(None, {"answer": "x"}, "exact")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)


def test_task_accuracy_with_known_completions(tok):
    script = tok.encode("The answer is 42.\nQ: next") + [tok.eos_id]
    prompts = ["Q: 12+30=", "Q: 50+18=", "Q: 16+26=", "Q: 90+99="]
    lengths = {len(tok.encode(p)) for p in prompts}
    assert len(lengths) == 1  # one prompt length, so the scripted model answers each the same way
    model = ScriptedLM(script, lengths.pop())
    records = [{"prompt": p, "answer": a, "line": i + 1} for i, (p, a) in enumerate(zip(prompts, [42, "42", 42, 189]))]
    r = task_accuracy(model, tok, records, batch_size=3)
    assert (r["correct"], r["total"], r["accuracy"]) == (3, 4, 0.75)
    assert r["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert [x["completion"] for x in r["records"]] == ["The answer is 42."] * 4  # stopped at the line break
    assert task_accuracy(model, tok, records, extract="regex", pattern=r"is (\d+)")["correct"] == 3
    assert task_accuracy(model, tok, records, extract="regex", pattern=r"is (\d)")["correct"] == 0  # "4"
    marked = task_accuracy(model, tok, records, marker="answer is")
    assert marked["correct"] == 3 and marked["answer_marker"] == "answer is"
    unmarked = task_accuracy(model, tok, records, marker="Answer:")  # not in the completions: no answers
    assert unmarked["correct"] == 0 and {x["predicted"] for x in unmarked["records"]} == {None}
    with pytest.raises(ConfigError, match="3 chains at temperature 0: every chain would be the same"):
        task_accuracy(model, tok, records, chains=3)
    voted = task_accuracy(model, tok, records, SamplingConfig(temperature=1.0, max_new_tokens=32, stop=("\n",),
                                                               seed=0), chains=3)
    assert voted["chains"] == 3 and voted["correct"] == 3  # the scripted model answers 42 in every chain
    assert voted["records"][0]["votes"] == {"42": 3} and len(voted["records"][0]["completions"]) == 3


def test_task_accuracy_reports_records_done_up_to_the_total(tok):
    script = tok.encode("The answer is 42.\nQ: next") + [tok.eos_id]
    prompts = ["Q: 12+30=", "Q: 50+18=", "Q: 16+26=", "Q: 90+99=", "Q: 40+ 2="]
    model = ScriptedLM(script, len(tok.encode(prompts[0])))
    records = [{"prompt": p, "answer": 42, "line": i + 1} for i, p in enumerate(prompts)]
    events = []
    task_accuracy(model, tok, records, batch_size=2, progress=collect(events))
    assert [(e.stage, e.unit, e.done, e.total) for e in events] == [("task", "records", n, 5) for n in (2, 4, 5)]


def test_task_accuracy_of_file_takes_a_task_config(model_dir, tmp_path):
    model, tok_, _ = load_for_inference(model_dir)
    prompts = ["To be, or not", "Good night", "What light"]
    outs = generate(model, tok_, prompts, SamplingConfig(temperature=0.0, max_new_tokens=6, stop=("\n",)))
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": g.text.strip() or "x", "extract": "exact"}) + "\n"
                            for p, g in zip(prompts, outs)))
    events = []
    r = task_accuracy_of_file(model_dir, path, TaskConfig(max_new_tokens=6, batch_size=2), collect(events))
    assert [x["completion"] for x in r["records"]] == [g.text for g in outs]
    assert r["sampling"] == TaskConfig(max_new_tokens=6).sampling.to_dict() and r["file"] == str(path)
    assert [e.done for e in events] == [2, 3]


def test_load_tasks_reports_the_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=f'{path}:3: no "answer"'):
        load_tasks(path)
    path.write_text('{"prompt": "a", "answer": 1}\nnot json\n')
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        load_tasks(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_tasks(path)
    good = '{"prompt": "a", "answer": "1"}\n'
    for record, message in [('["prompt", "answer"]', "expected a JSON object"),
                            ('{"prompt": "a", "answer": NaN}', '"answer" must be a non-empty string or a finite'),
                            ('{"prompt": "a", "answer": true}', '"answer" must be'),
                            ('{"prompt": "a", "answer": "b", "extract": ["exact"]}', '"extract" \\[\'exact\'\\]'),
                            ('{"prompt": "a", "answer": "b", "pattern": 5}', '"pattern" must be a regular expression'),
                            ('{"prompt": "a", "answer": "b", "pattern": "(("}', "invalid regular expression"),
                            ('{"prompt": "a", "answer": "b", "extract": "number"}', "answer 'b' is not a number")]:
        path.write_text(good + record + "\n")
        with pytest.raises(DataError, match=f"{path}:2: {message}"):
            load_tasks(path)
    path.write_text(good + '{"prompt": "b", "answer": 2.5, "extract": "regex", "pattern": "(\\\\d)"}\n')
    assert [(r["line"], r["answer"]) for r in load_tasks(path)] == [(1, "1"), (2, 2.5)]


# --- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:6000])
    return path


def test_eval_perplexity_command_json(cli, model_dir, text_file):
    r = cli("eval", "perplexity", model_dir, text_file, "--context", "64", "--json")
    assert r.code == 0, r.err
    result = r.json()
    model, tok_, _ = load_for_inference(model_dir)
    direct = perplexity(model, tok_.encode(text_file.read_text()), ctx=64)
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    for key in ("perplexity", "nll", "bits_per_byte", "tokens", "std_error", "tokens_per_s"):
        assert key in result
    assert result["convention"] == "llama.cpp"
    strided = cli("eval", "perplexity", model_dir, text_file, "--context", "64", "--stride", "32", "--json").json()
    assert strided["convention"] == "sliding" and strided["tokens"] == strided["file_tokens"] - 1


def test_eval_perplexity_human_output(cli, model_dir, text_file):
    r = cli("eval", "perplexity", model_dir, text_file)
    assert r.code == 0, r.err
    assert "perplexity" in r.out and "bits/byte" in r.out and "tokens/s" in r.out


def test_eval_task_command(cli, model_dir, tmp_path):
    model, tok_, _ = load_for_inference(model_dir)
    prompts = ["To be, or not", "Good night", "What light", "O Romeo"]
    outs = generate(model, tok_, prompts, SamplingConfig(temperature=0.0, max_new_tokens=8, stop=("\n",)))
    answers = [g.text.strip() if i % 2 == 0 else "wrong answer" for i, g in enumerate(outs)]
    assert all(answers[::2])  # the model's own greedy completions are not empty
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "extract": "exact"}) + "\n"
                            for p, a in zip(prompts, answers)))
    r = cli("eval", "task", model_dir, path, "--max-new-tokens", "8", "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert (result["correct"], result["total"]) == (2, 4)
    assert result["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    human = cli("eval", "task", model_dir, path, "--max-new-tokens", "8", "--show", "2")
    assert "accuracy 0.5000 (2/4)" in human.out and "95% CI" in human.out


TASK_FILES = {  # the bad task files of the cases below, and the line their error names
    "bad-jsonl": ('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n', "tasks.jsonl:2: no \"prompt\""),
    "garbage-line": ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": "d"}\nnot json at all\n',
                     "tasks.jsonl:4: not valid JSON (Expecting value, column 1)"),
    "no-answer": ('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n', 'tasks.jsonl:2: no "answer"'),
    "not-an-object": ('{"prompt": "a", "answer": "b"}\n["a", "b"]\n', "tasks.jsonl:2: expected a JSON object"),
    "binary-file": (bytes(range(256)), "tasks.jsonl is not UTF-8 text (byte 128)"),
    "pattern-not-text": ('{"prompt": "a", "answer": "b", "extract": "regex", "pattern": 5}\n',
                         'tasks.jsonl:1: "pattern" must be a regular expression'),
    "answer-not-a-number": ('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n',
                            "tasks.jsonl:1: answer 'b' is not a number"),
}


@pytest.mark.parametrize("case", ["short-file", "missing-model", "no-tokenizer", "missing-file", "ctx-too-long",
                                  "bad-extract", "regex-without-pattern", *TASK_FILES])
def test_eval_bad_input_is_one_line_exit_2(case, cli, model_dir, text_file, tmp_path):
    from lbdl_cli.checkpoint import save_model

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    tasks = tmp_path / "tasks.jsonl"
    content = TASK_FILES[case][0] if case in TASK_FILES else '{"prompt": "a", "answer": "b"}\n'
    tasks.write_bytes(content if isinstance(content, bytes) else content.encode())
    if case == "no-tokenizer":
        save_model(tiny_model(vocab_size=400), tmp_path / "no-tok")
    args = {
        "short-file": ["perplexity", model_dir, short, "--context", "64"],
        "missing-model": ["perplexity", tmp_path / "nope", text_file],
        "no-tokenizer": ["perplexity", tmp_path / "no-tok", text_file],
        "missing-file": ["perplexity", model_dir, tmp_path / "absent.txt"],
        "ctx-too-long": ["perplexity", model_dir, text_file, "--context", "65"],
        "bad-extract": ["task", model_dir, tasks, "--extract", "vibes"],
        "regex-without-pattern": ["task", model_dir, tasks, "--extract", "regex"],
        "answer-not-a-number": ["task", model_dir, tasks, "--extract", "number"],
    }.get(case, ["task", model_dir, tasks])
    r = cli("eval", *args)
    assert r.code == 2, (r.out, r.err)
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbdl: error:"), r.err
    expected = {"short-file": "needs at least 64 tokens", "missing-model": "does not exist",
                "no-tokenizer": "tokenizer.model", "missing-file": "does not exist",
                "ctx-too-long": "block_size 64", "bad-extract": "vibes",
                "regex-without-pattern": "tasks.jsonl:1: regex extraction needs a pattern",
                **{name: message for name, (_, message) in TASK_FILES.items()}}[case]
    assert expected in lines[0]
    if case in TASK_FILES:
        assert f"task file {tasks}" in lines[0]  # the whole path of the file


def test_eval_task_builds_few_shot_and_chain_of_thought_prompts(cli, model_dir, tmp_path):
    """--shots/--n-shots/--cot: each record's prompt is the query of a built prompt (whole shots, dropped to fit
    the model's context of 64 tokens), the completions are the model's greedy ones for that prompt."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "Q: What is two and two? A:", "answer": "4"}\n'
                     '{"prompt": "Q: What is one and one? A:", "answer": "2"}\n')
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"input": "1+2", "output": "3", "cot": "one and two make 3"}\n'
                     '{"input": "2+3", "output": "5", "cot": "two and three make 5"}\n')
    common = ["--max-new-tokens", "4", "--compute-dtype", "float32", "--json"]
    r = cli("eval", "task", model_dir, tasks, "--shots", shots, "--n-shots", "2", *common)
    assert r.code == 0, r.err
    result = r.json()
    assert result["prompt"]["shots_used"] == [2, 2] and result["prompt"]["shots_dropped"] == 0
    first = result["records"][0]["prompt"]
    assert first.endswith("\nQ: What is two and two? A:") and first.count("Q: ") == 3 and "Q: 1+2 A: 3" in first
    r = cli("eval", "task", model_dir, tasks, "--shots", shots, "--n-shots", "1", "--cot", "--trigger", "Steps:",
            *common)
    result = r.json()
    cot = result["records"][1]["prompt"]
    assert r.code == 0 and result["prompt"]["shots_used"] == [1, 1] and result["prompt"]["cot"]
    assert cot.endswith("\nQ: What is one and one? A: Steps:") and cot.count("Steps:") == 2
    assert "one and two make 3" in cot or "two and three make 5" in cot
    long = tmp_path / "long.jsonl"  # two shots of ~40 tokens each cannot both fit in 64 - 4
    long.write_text("".join(json.dumps({"input": "To be, or not to be, that is the question " * 2, "output": str(i)})
                            + "\n" for i in range(2)))
    r = cli("eval", "task", model_dir, tasks, "--shots", long, "--n-shots", "2", *common)
    assert r.code == 0 and r.json()["prompt"]["shots_dropped"] >= 1, r.err
    r = cli("eval", "task", model_dir, tasks, "--self-consistency", "3", "--temperature", "0.8", *common)
    record = r.json()["records"][0]
    assert r.code == 0 and r.json()["chains"] == 3 and len(record["completions"]) == 3
    assert sum(record["votes"].values()) <= 3 and record["completion"] == record["completions"][0]
    for args, says in [(["--shots", shots, "--n-shots", "0"], "n_shots 0 with a shots file"),
                       (["--shots", tasks.with_name("nope.jsonl")], "nope.jsonl"),
                       (["--self-consistency", "3"], "every chain would be the same; give --temperature above 0"),
                       (["--self-consistency", "0", "--temperature", "1"], "self_consistency must be in [1, ")]:
        r = cli("eval", "task", model_dir, tasks, *args, *common)
        assert r.code == 2 and says in r.err, r.err


def test_paired_difference_and_mcnemar_known_answers():
    from lbdl_cli.evaluate import paired_difference

    a = [True, True, False, False, False, True, False, False, False, False]
    b = [True, False, True, True, True, True, True, False, False, False]
    r = paired_difference(a, b)  # discordant: 4 right only with b, 1 only with a
    assert (r["only_b"], r["only_a"]) == (4, 1) and r["difference"] == pytest.approx(0.3)
    assert r["mcnemar_p"] == pytest.approx(2 * (1 + 5) / 32)  # 2 P(X <= 1), X ~ Bin(5, 1/2)
    se = math.sqrt(5 - 9 / 10) / 10
    assert r["ci95"] == pytest.approx([0.3 - 1.959964 * se, 0.3 + 1.959964 * se])
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["mcnemar_p"] == 1.0 and same["ci95"] == [0.0, 0.0]


def test_eval_task_compare_runs_every_strategy_on_the_same_records(cli, model_dir, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Q: {i}+1 A:", "answer": str(i + 1)}) + "\n" for i in range(4)))
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"input": "1+2", "output": "3", "cot": "3"}\n')
    r = cli("eval", "task", model_dir, tasks, "--shots", shots, "--n-shots", "1", "--compare", "direct", "--compare",
            "cot", "--compare", "self-consistency", "--self-consistency", "2", "--temperature", "0.5",
            "--max-new-tokens", "3",
            "--compute-dtype", "float32", "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert [s["strategy"] for s in result["strategies"]] == ["direct", "cot", "self-consistency"]
    assert [s["chains"] for s in result["strategies"]] == [1, 1, 2]
    assert [s["temperature"] for s in result["strategies"]] == [0, 0, 0.5]  # direct and cot greedy
    assert [p["b"] for p in result["paired"]] == ["cot", "self-consistency"]
    runs = result["runs"]
    assert not runs[0]["prompt"]["cot"] and runs[1]["prompt"]["cot"] and runs[2]["chains"] == 2
    for pair, run in zip(result["paired"], runs[1:]):
        assert pair["difference"] == pytest.approx(run["accuracy"] - runs[0]["accuracy"])
    r = cli("eval", "task", model_dir, tasks, "--compare", "direct", "--compare", "magic")
    assert r.code == 2 and "--compare strategy 'magic' is not one of direct, cot, self-consistency" in r.err
