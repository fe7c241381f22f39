"""Prompts: the formats as exact strings, seeded shot selection, chain-of-thought layout, fitting a context by
whole shots, bad shots files and configs, the majority vote."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, assert_round_trips

from lbdl_cli.errors import ConfigError, DataError
from lbdl_cli.prompting import (
    PromptConfig,
    Shot,
    assemble,
    build_prompt,
    load_shots,
    majority_vote,
    select_shots,
)

ARITH = ROOT / "data" / "tasks" / "arithmetic-train.jsonl"
SHOTS = [Shot("2 + 2", "4"), Shot("3 + 5", "8")]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_formats_known_strings():
    pool = [SHOTS[0]]
    assert build_prompt("1 + 6", PromptConfig(n_shots=1), pool).text == "Q: 2 + 2 A: 4\nQ: 1 + 6 A:"
    assert build_prompt("1 + 6", PromptConfig(format="io", n_shots=1), pool).text == "I: 2 + 2, O: 4, I: 1 + 6, O:"
    user = PromptConfig(format="Question: {input}\nAnswer: {output}", n_shots=1)
    assert build_prompt("1 + 6", user, pool).text == "Question: 2 + 2\nAnswer: 4\nQuestion: 1 + 6\nAnswer:"
    instructed = PromptConfig(n_shots=1, instruction="Experts wrote these.", separator="\n\n")
    assert build_prompt("1 + 6", instructed, pool).text == "Experts wrote these.\nQ: 2 + 2 A: 4\n\nQ: 1 + 6 A:"
    zero = build_prompt("Q: 1 + 6 A:", PromptConfig())  # no shots: zero-shot; an already-wrapped query unwrapped
    assert (zero.text, zero.shots_used, zero.shots_dropped) == ("Q: 1 + 6 A:", 0, 0)
    assert_round_trips(instructed)


def test_seeded_selection_is_reproducible_and_depends_on_the_seed():
    pool = load_shots(ARITH)
    assert len(pool) == 800 and pool[0].output == "60" and pool[0].where.endswith("arithmetic-train.jsonl:1")
    a = select_shots(pool, PromptConfig(shots=str(ARITH), n_shots=4, seed=1))
    assert a == select_shots(pool, PromptConfig(shots=str(ARITH), n_shots=4, seed=1))
    assert a != select_shots(pool, PromptConfig(shots=str(ARITH), n_shots=4, seed=2))
    assert len(set(a)) == 4
    cfg = PromptConfig(shots=str(ARITH), n_shots=4, seed=1)
    assert build_prompt("1 + 1", cfg).text == build_prompt("1 + 1", cfg, pool).text  # loaded from cfg.shots
    with pytest.raises(ConfigError, match="holds 2; use --n-shots 2 or less"):
        select_shots(SHOTS, PromptConfig(n_shots=3))


def test_cot_layout_on_the_arithmetic_shots():
    first, second = load_shots(ARITH)[:2]
    prompt = build_prompt("Q: Mira has 57 books. She gives Ada 19 books. After that she gives Sara 18 books. Later "
                          "she loses 10 books. How many books does Mira have at the end? A:",
                          PromptConfig(n_shots=1, cot=True), [first])
    assert prompt.text == (
        "Q: Paul keeps 46 candies in a box, he eats 42 candies, and buys 56 more candies. How many candies does Paul "
        "have at the end? A: Let's proceed step by step: Paul keeps 46 candies in a box, he eats 42 candies "
        "(4 left), and buys 56 more candies (60 now). So Paul has 60 candies at the end.\n"
        "Q: Mira has 57 books. She gives Ada 19 books. After that she gives Sara 18 books. Later she loses 10 "
        "books. How many books does Mira have at the end? A: Let's proceed step by step:")
    direct = build_prompt("How many?", PromptConfig(n_shots=1), [second]).text
    assert direct.startswith("Q: Mira has 57 books.") and direct.endswith("at the end? A: 10\nQ: How many? A:")
    # a cot text without the trigger gets it; another trigger is used as given
    own = build_prompt("x", PromptConfig(n_shots=1, cot=True, trigger="Think:"), [Shot("a", "1", "a is 1.")])
    assert own.text == "Q: a A: Think: a is 1.\nQ: x A: Think:"
    with pytest.raises(DataError, match="shot: no \"cot\""):
        build_prompt("x", PromptConfig(n_shots=1, cot=True), [Shot("a", "1")])


def test_whole_shots_are_dropped_to_fit_the_context(tok):
    pool = [Shot(f"What is {i} plus {i}?", str(2 * i)) for i in range(1, 7)]
    cfg = PromptConfig(n_shots=6, seed=3)
    chosen = select_shots(pool, cfg)
    full = build_prompt("What is 9 plus 9?", cfg, pool)
    need = len(tok.encode(full.text))
    assert build_prompt("What is 9 plus 9?", cfg, pool, tok, context=need + 8, max_new_tokens=8).shots_dropped == 0
    fitted = build_prompt("What is 9 plus 9?", cfg, pool, tok, context=need + 7, max_new_tokens=16)
    assert fitted.shots_dropped > 0 and fitted.shots_used + fitted.shots_dropped == 6
    assert fitted.tokens == len(tok.encode(fitted.text)) <= need + 7 - 16
    kept = chosen[:fitted.shots_used]  # the first of the selection kept, whole
    assert fitted.text.startswith("\n".join(f"Q: {s.input} A: {s.output}" for s in kept))
    assert fitted.text.endswith(f"A: {kept[-1].output}\nQ: What is 9 plus 9? A:")
    # one shot more would not have fitted
    bigger = assemble("What is 9 plus 9?", cfg, chosen[:fitted.shots_used + 1])
    assert len(tok.encode(bigger)) > need + 7 - 16
    with pytest.raises(ConfigError, match="prompt without shots is"):
        build_prompt("What is 9 plus 9?", cfg, pool, tok, context=10, max_new_tokens=8)
    with pytest.raises(ConfigError, match="leaves no room"):
        build_prompt("x", cfg, pool, tok, context=8, max_new_tokens=8)


def test_shots_files(tmp_path):
    jsonl = write(tmp_path / "s.jsonl", ['{"input": "a", "output": 1, "cot": "a is 1."}', "",
                                          '{"prompt": "Q: b A:", "completion": " 2\\n"}'])
    assert load_shots(jsonl) == [Shot("a", "1", "a is 1.", f"shots file {jsonl}:1"),
                                 Shot("Q: b A:", "2", None, f"shots file {jsonl}:3")]
    toml = tmp_path / "s.toml"
    toml.write_text('[[shots]]\ninput = "a"\noutput = "1"\n\n[[shots]]\ninput = "b"\nanswer = "2"\n')
    assert [(s.input, s.output) for s in load_shots(toml)] == [("a", "1"), ("b", "2")]
    assert build_prompt("c", PromptConfig(n_shots=2, seed=0), load_shots(jsonl)).text.count("Q: b A: 2") == 1


@pytest.mark.parametrize("lines, message", [
    (['{"input": "a", "output": "1"}', '{"input": "b", "output": '], r"s.jsonl:2: not valid JSON"),
    (['{"input": "a", "output": "1"}', '[1, 2]'], r"s.jsonl:2: expected a JSON object"),
    (['{"output": "1"}'], r's.jsonl:1: no "input" \(or "prompt"\)'),
    (['{"input": "a"}'], r's.jsonl:1: no "output"'),
    (['{"input": "a", "output": true}'], r's.jsonl:1: "output" must be'),
    (['{"input": "a", "output": "1", "cot": ""}'], r's.jsonl:1: "cot" must be'),
    ([""], r"holds no shots"),
])
def test_bad_shots_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_shots(write(tmp_path / "s.jsonl", lines))


def test_bad_configs():
    with pytest.raises(ConfigError, match="n_shots 0 with a shots file"):
        PromptConfig(shots="s.jsonl", n_shots=0)
    with pytest.raises(ConfigError, match=r"must hold \{input\} once"):
        PromptConfig(format="Answer: {output}")
    with pytest.raises(ConfigError, match=r"must hold \{output\} once"):
        PromptConfig(format="Question: {input}")
    with pytest.raises(ConfigError, match="before"):
        PromptConfig(format="{output} <- {input}")
    with pytest.raises(ConfigError, match="trigger is empty"):
        PromptConfig(cot=True, trigger=" ")
    with pytest.raises(ConfigError, match="unknown key 'shot'"):
        PromptConfig.from_dict({"shot": "x"})
    with pytest.raises(ConfigError, match="query is empty"):
        build_prompt("  ", PromptConfig())


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, "3", "4"]) == ("4", {"3": 2, "4": 3})
    assert majority_vote([None, "7", "5", "5", "7"]) == ("7", {"7": 2, "5": 2})  # a tie: the first to appear
    assert majority_vote(["1"]) == ("1", {"1": 1})
    assert majority_vote([None, None]) == (None, {})
    assert majority_vote([]) == (None, {})


def test_evaluate_shares_the_extraction():
    from lbdl_cli import evaluate, prompting

    for name in ("canonical_number", "_compile", "resolve_method", "extract_answer", "is_correct", "EXTRACT_METHODS"):
        assert getattr(evaluate, name) is getattr(prompting, name)
    rec = json.loads(ARITH.read_text().splitlines()[0])
    chain = rec["cot_completion"]
    assert prompting.extract_answer(chain, "last-number") == "60" and prompting.is_correct("60", rec, "last-number")


def test_a_query_is_never_its_own_shot():
    pool = [Shot(f"{i} + {i}", str(2 * i)) for i in range(1, 6)]
    cfg = PromptConfig(n_shots=4, seed=0)
    for i in range(1, 6):  # every shot as the query (wrapped, as task records are): the other four, never itself
        text = build_prompt(f"Q: {i} + {i} A:", cfg, pool).text
        assert text.count(f"Q: {i} + {i} A:") == 1 and text.endswith(f"Q: {i} + {i} A:")
        assert text.count("\n") == 4
    assert select_shots(pool, cfg, "7 + 7") == select_shots(pool, cfg)  # a new query: the seed's usual draw
    with pytest.raises(ConfigError, match="holds 4 other than the query itself; use --n-shots 4 or less"):
        select_shots(pool, PromptConfig(n_shots=5), "Q: 3 + 3 A:")
