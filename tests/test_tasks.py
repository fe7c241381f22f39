"""data/tasks/: the generator reruns byte-identically, the arithmetic adds up, the records load as task files,
the splits are disjoint and the fictional world is consistent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest
from conftest import ROOT

from lbdl_cli.evaluate import extract_answer, is_correct, load_tasks, resolve_method

TASKS = ROOT / "data" / "tasks"
SCRIPT = ROOT / "data" / "make_tasks.py"
TASK_FILES = ["arithmetic-train.jsonl", "arithmetic-test.jsonl", "arithmetic-test-cot.jsonl",
              "facts-train.jsonl", "facts-test.jsonl"]
TRIGGER = " Let's proceed step by step:"
MARK = re.compile(r" \((\d+) (left|now)\)")


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines()]


def test_the_generator_rewrites_the_shipped_files_byte_identically(tmp_path):
    outs = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / run)], check=True,
                       capture_output=True)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    shipped = {p.name: p.read_bytes() for p in sorted(TASKS.iterdir()) if p.name != "README.md"}
    assert outs[0] == outs[1]
    assert sorted(outs[0]) == sorted(shipped) == sorted(TASK_FILES + ["facts-docs.jsonl"])
    for name in shipped:
        assert outs[0][name] == shipped[name], f"data/tasks/{name} differs from `python data/make_tasks.py`"
    assert sum(len(b) for b in shipped.values()) < 1_000_000


def test_the_readme_gives_each_file_and_its_count():
    readme = (TASKS / "README.md").read_text(encoding="utf-8")
    for name in TASK_FILES + ["facts-docs.jsonl"]:
        n = len(records(name))
        assert re.search(rf"`{re.escape(name)}` \| {n} \|", readme), f"README.md: no row `{name}` | {n} |"


def check_trace(rec: dict) -> list[int]:
    """The counts of a problem's trace, recomputed from its operations; asserts each step's arithmetic."""
    trace = rec["cot_completion"]
    assert trace.startswith(TRIGGER + " ") and trace.endswith("\n")
    story, closing = trace[len(TRIGGER) + 1:-1].rsplit(". So ", 1)
    # the trace is the question's story with the counts inserted
    question = rec["prompt"][len("Q: "):-len(" A:")]
    assert question.startswith(MARK.sub("", story) + ". How many ")
    pieces = MARK.split(story)  # text, count, left|now, text, count, left|now, ..., text
    start = [int(x) for x in re.findall(r"\d+", pieces[0])]
    assert len(start) == 2 and start[0] >= 20  # the opening count, and the first operation's amount
    counts = [start[0]]
    for i in range(0, len(pieces) - 1, 3):
        amount = int(re.findall(r"\d+", pieces[i])[-1])  # the last number before the mark
        sign = -1 if pieces[i + 2] == "left" else 1
        assert int(pieces[i + 1]) == counts[-1] + sign * amount, f"{rec['prompt']}: {pieces[i]!r}"
        counts.append(int(pieces[i + 1]))
    assert min(counts) >= 2
    assert [int(x) for x in re.findall(r"\d+", closing)] == [counts[-1]]
    return counts


def test_every_arithmetic_answer_is_the_arithmetic_of_its_steps():
    for name in ("arithmetic-train.jsonl", "arithmetic-test.jsonl"):
        for rec in records(name):
            counts = check_trace(rec)
            assert rec["answer"] == str(counts[-1])
            assert rec["completion"] == f" {rec['answer']}\n"
            assert rec["n_steps"] == len(counts) - 1 and 2 <= rec["n_steps"] <= 4


def test_the_trace_check_catches_a_wrong_step():
    rec = records("arithmetic-test.jsonl")[0]
    check_trace(rec)
    first = MARK.search(rec["cot_completion"])
    wrong = first.group(0).replace(first.group(1), str(int(first.group(1)) + 1))
    with pytest.raises(AssertionError):
        check_trace({**rec, "cot_completion": rec["cot_completion"].replace(first.group(0), wrong, 1)})


def test_the_chain_of_thought_file_asks_the_test_questions_with_the_trigger():
    test, cot = records("arithmetic-test.jsonl"), records("arithmetic-test-cot.jsonl")
    assert [(r["prompt"] + TRIGGER, r["answer"]) for r in test] == [(r["prompt"], r["answer"]) for r in cot]


@pytest.mark.parametrize("name", TASK_FILES)
def test_records_load_as_task_files_and_their_completions_score(name):
    loaded = load_tasks(TASKS / name)
    assert len(loaded) == len(records(name)) >= 200
    for rec in loaded:
        assert rec["prompt"].startswith("Q: ") and rec["prompt"].count("\n") == 0
        method = resolve_method(rec, "auto")
        assert method == ("number" if name.startswith("arithmetic") or rec.get("kind") == "age" else "exact")
        if "completion" in rec:  # the reference completion is right, the answer of the next record is not
            assert is_correct(extract_answer(rec["completion"], method), rec, method)
        if "cot_completion" in rec:  # chain of thought: the last number is the answer
            assert is_correct(extract_answer(rec["cot_completion"], "last-number"), rec, "last-number")
    wrong = [is_correct(extract_answer(a["completion"], resolve_method(b, "auto")), b, resolve_method(b, "auto"))
             for a, b in zip(loaded, loaded[1:]) if "completion" in a and a["answer"] != b["answer"]]
    assert name.endswith("-cot.jsonl") or (wrong and not any(wrong))


@pytest.mark.parametrize("task", ["arithmetic", "facts"])
def test_splits_are_disjoint_and_hold_no_repeated_question(task):
    train = [r["prompt"] for r in records(f"{task}-train.jsonl")]
    test = [r["prompt"] for r in records(f"{task}-test.jsonl")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text)


def test_facts_are_consistent_in_documents_and_paraphrased_in_train():
    docs = {d["id"]: d for d in records("facts-docs.jsonl")}
    assert len(docs) == len(records("facts-docs.jsonl"))
    train, test = records("facts-train.jsonl"), records("facts-test.jsonl")
    answers, asked, per_subject = defaultdict(set), defaultdict(set), defaultdict(set)
    for rec in train + test:
        assert rec["completion"] == f" {rec['answer']}\n"
        assert rec["fact"] in sentences(docs[rec["doc"]]["text"])  # in its document, as one sentence
        assert re.search(rf"\b{rec['answer']}\b", rec["fact"])
        answers[rec["fact"]].add(rec["answer"])
        # the subject: the person or country of the document, or the city that a "country" fact is about
        subject = rec["fact"].split(" is a city in ")[0] if rec["kind"] == "country" else docs[rec["doc"]]["title"]
        assert subject in rec["prompt"]
        per_subject[subject, rec["kind"]].add(rec["answer"])
    for rec in train:
        asked[rec["fact"]].add(rec["prompt"])
    assert all(len(a) == 1 for a in answers.values())
    assert all(len(a) == 1 for a in per_subject.values())  # no person with two ages, no country with two capitals
    for rec in test:  # each test fact is in train, asked otherwise
        assert asked[rec["fact"]] and rec["prompt"] not in asked[rec["fact"]]
    assert {r["fact"] for r in test} == set(asked)  # and every fact is tested
    assert sorted(s for d in docs.values() for s in sentences(d["text"])) == sorted(answers)  # docs: only facts
    cities = {a for (_, kind), a_ in per_subject.items() if kind == "capital" for a in a_}
    cities |= {s for s, kind in per_subject if kind == "country"}
    assert set().union(*(a for (_, kind), a in per_subject.items() if kind == "city")) <= cities


def test_eval_task_runs_on_the_arithmetic_test(cli, tmp_path):
    path = tmp_path / "five.jsonl"
    path.write_text("".join((TASKS / "arithmetic-test.jsonl").read_text(encoding="utf-8").splitlines(True)[:5]),
                    encoding="utf-8")
    r = cli("eval", "task", ROOT / "models" / "default", path, "--extract", "number", "--max-new-tokens", "8",
            "--json")
    assert r.code == 0, r.err
    assert r.json()["total"] == 5
