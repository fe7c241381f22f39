"""Every command's `--json` object against docs/JSON.md: the doc's tables are the one list of keys.

docs/JSON.md has a section `## lbdl COMMAND` for every command of the app, and in it one table per mode, each
after a line `Keys:` (the plain run) or `Keys (MODE):`. A table's rows are `| `key` | type | stable | meaning |`;
a key written `` `key`? `` is there only in some runs. Each (command, mode) here runs on tiny inputs and its
last line of output must hold every always-present key, with its documented type, and no key the doc does not
list; a (command, mode) that is documented but not run is named in NOT_RUN with the reason.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, tiny_model
from test_cli_names import COMMANDS_

DOC = ROOT / "docs" / "JSON.md"
TYPES = {"string": str, "int": int, "number": (int, float), "bool": bool, "object": dict, "array": list,
         "null": type(None)}
KEY_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_]+)`(\?)?\s*\|\s*([^|]+?)\s*\|\s*(yes|no)\s*\|")


def read_doc() -> dict:
    """{(command, mode): {key: (types, always present)}} from docs/JSON.md's tables."""
    tables, command, mode = {}, None, None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            found = re.fullmatch(r"## `lbdl ([a-z -]+)`", line.strip())
            command, mode = (found.group(1).strip() if found else None), None
        elif command and (found := re.fullmatch(r"Keys(?: \((.+)\))?:", line.strip())):
            mode = found.group(1) or ""
            tables[(command, mode)] = {}
        elif command and mode is not None and (row := KEY_ROW.match(line)):
            kinds = tuple(TYPES[t.strip()] for t in row.group(3).split(" or "))
            tables[(command, mode)][row.group(1)] = (kinds, row.group(2) is None)
        elif mode is not None and line.strip() and not line.startswith("|"):
            mode = None  # the table ended
    return tables


DOCUMENTED = read_doc()

TASKS = [{"prompt": "Q: 2+2? A:", "answer": "4"}, {"prompt": "Q: 3+3? A:", "answer": "6"}]
MERGE_TASKS = [{"prompt": "To be", "completion": " the king", "answer": "the king"},
               {"prompt": "Alas", "completion": " my lord", "answer": "my lord"}]
DOCS = {"cats.md": "# Cats\n\nCats purr when they are content.\n", "dogs.md": "# Dogs\n\nDogs bark at strangers.\n",
        "fish.txt": "Fish swim in rivers and seas.\n", "birds.txt": "Birds fly south in winter.\n"}
TRAIN = ["--context", "32", "--batch-size", "2", "--compute-dtype", "float32", "--device", "cpu"]
RUN = [*TRAIN, "--eval-batches", "1", "--peak-tflops", "1"]
PIPELINE = """[vars]
work = "w"

[steps.inspect]
command = "tokenizer inspect"
tokenizer = "{tok}"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, tok_dir, model_dir):
    """Tiny inputs for every command: a text, task and record files, documents, two fine-tunes of the model, a
    wider model for prompts with sources; train and lr-find start from the tiny model (a preset is 15x bigger)."""
    from lbdl_cli.checkpoint import save_model

    root = tmp_path_factory.mktemp("json")
    text = (ROOT / "data" / "tinyshakespeare-val.txt").read_text()[:3000]
    (root / "t.txt").write_text(text)
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TASKS))
    (root / "merge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MERGE_TASKS))
    records = (ROOT / "data" / "tasks" / "facts-train.jsonl").read_text().splitlines()[:24]
    (root / "records.jsonl").write_text("\n".join(records) + "\n")
    (root / "docs").mkdir()
    for name, body in DOCS.items():
        (root / "docs" / name).write_text(body)
    tokenizer = tok_dir / "tokenizer.model"
    for seed in (1, 2):
        save_model(tiny_model(seed, vocab_size=400, block_size=64), root / f"ft{seed}", tokenizer=tokenizer)
    save_model(tiny_model(vocab_size=400, block_size=256), root / "wide", tokenizer=tokenizer)
    (root / "p.toml").write_text(PIPELINE.replace("{tok}", str(tok_dir)))
    (root / "lr.toml").write_text(f"init_from = {json.dumps(str(model_dir))}\n")  # lr-find takes no --init-from
    return {"root": root, "tok": tok_dir, "model": model_dir}


# (command, mode): (the arguments as a function of the world's paths, the cases that must run first)
CASES = {
    ("init", ""): (lambda w: ["init", "--preset", "nano", "--vocab-size", "300", "--context", "32",
                              "--out", w["root"] / "init"], ()),
    ("presets", ""): (lambda w: ["presets"], ()),
    ("info", ""): (lambda w: ["info", w["model"]], ()),
    ("info", "a quantized model"): (lambda w: ["info", w["root"] / "q8"], (("quantize model", ""),)),
    ("info", "--system"): (lambda w: ["info", "--system"], ()),
    ("tokenizer train", ""): (lambda w: ["tokenizer", "train", w["root"] / "t.txt", "--vocab-size", "400",
                                         "--out", w["root"] / "tok"], ()),
    ("tokenizer encode", ""): (lambda w: ["tokenizer", "encode", w["tok"], "To be, or not"], ()),
    ("tokenizer decode", ""): (lambda w: ["tokenizer", "decode", w["tok"], "300 301 302"], ()),
    ("tokenizer inspect", ""): (lambda w: ["tokenizer", "inspect", w["tok"], "--text", w["root"] / "t.txt"], ()),
    ("data prepare", ""): (lambda w: ["data", "prepare", w["root"] / "t.txt", "--tokenizer", w["tok"],
                                      "--out", w["root"] / "shards"], ()),
    ("data info", ""): (lambda w: ["data", "info", w["root"] / "shards"], (("data prepare", ""),)),
    ("train", ""): (lambda w: ["train", "--init-from", w["model"], "--data", w["root"] / "shards", *RUN,
                               "--max-steps", "2", "--eval-interval", "2", "--out", w["root"] / "run"],
                    (("data prepare", ""),)),
    ("lr-find", ""): (lambda w: ["lr-find", "--config", w["root"] / "lr.toml", "--data", w["root"] / "shards", *TRAIN,
                                 "--steps", "1"], (("data prepare", ""),)),
    ("plot", ""): (lambda w: ["plot", w["root"] / "run"], (("train", ""),)),
    ("finetune", ""): (lambda w: ["finetune", w["model"], w["root"] / "records.jsonl", *RUN, "--context", "64",
                                  "--max-steps", "2", "--eval-interval", "2", "--rank", "2",
                                  "--out", w["root"] / "ft"], ()),
    ("generate", ""): (lambda w: ["generate", w["model"], "To be", "-n", "4", "--compute-dtype", "float32"], ()),
    ("generate", "a built prompt"): (lambda w: ["generate", w["model"], "2+2?", "--cot", "-n", "4",
                                                "--compute-dtype", "float32"], ()),
    ("generate", "--rag"): (lambda w: ["generate", w["root"] / "wide", "Why do dogs bark?", "--rag",
                                       w["root"] / "index", "--k", "1", "-n", "4", "--compute-dtype", "float32"],
                            (("rag index", ""),)),
    ("eval perplexity", ""): (lambda w: ["eval", "perplexity", w["model"], w["root"] / "t.txt",
                                         "--compute-dtype", "float32"], ()),
    ("eval task", ""): (lambda w: ["eval", "task", w["model"], w["root"] / "tasks.jsonl", "--max-new-tokens", "3",
                                   "--compute-dtype", "float32"], ()),
    ("eval task", "--compare"): (lambda w: ["eval", "task", w["model"], w["root"] / "tasks.jsonl", "--compare",
                                            "direct", "--compare", "cot", "--max-new-tokens", "3",
                                            "--compute-dtype", "float32"], ()),
    ("quantize model", ""): (lambda w: ["quantize", w["model"], "--type", "q8_0", "--out", w["root"] / "q8"], ()),
    ("quantize sweep", ""): (lambda w: ["quantize", "sweep", w["model"], "--eval", w["root"] / "t.txt", "--types",
                                        "q8_0", "--recipes", "pure", "--compute-dtype", "float32"], ()),
    ("lora merge", ""): (lambda w: ["lora", "merge", w["model"], w["root"] / "ft" / "best",
                                    "--out", w["root"] / "merged"], (("finetune", ""),)),
    ("merge run", ""): (lambda w: ["merge", "--base", w["model"], "--model", w["root"] / "ft1", "--model",
                                   w["root"] / "ft2", "--out", w["root"] / "m"], ()),
    ("merge run", "--list"): (lambda w: ["merge", "--list"], ()),
    ("merge search", ""): (lambda w: ["merge", "search", "--base", w["model"], "--model", w["root"] / "ft1",
                                      "--model", w["root"] / "ft2", "--eval", w["root"] / "merge.jsonl",
                                      "--trials", "2", "--population", "4", "--out", w["root"] / "search"], ()),
    ("rag index", ""): (lambda w: ["rag", "index", w["root"] / "docs", "--out", w["root"] / "index"], ()),
    ("rag query", ""): (lambda w: ["rag", "query", w["root"] / "index", "dogs bark"], (("rag index", ""),)),
    ("rag query", "--answer-with"): (lambda w: ["rag", "query", w["root"] / "index", "Why do dogs bark?", "--k", "1",
                                                "--answer-with", w["root"] / "wide", "-n", "4",
                                                "--compute-dtype", "float32"], (("rag index", ""),)),
    ("pipeline run", ""): (lambda w: ["pipeline", "run", w["root"] / "p.toml"], ()),
    ("pipeline run", "--dry-run"): (lambda w: ["pipeline", "run", w["root"] / "p.toml", "--dry-run"], ()),
    ("pipeline validate", ""): (lambda w: ["pipeline", "validate", w["root"] / "p.toml"], ()),
    ("pipeline show", ""): (lambda w: ["pipeline", "show", w["root"] / "p.toml"], ()),
    ("convert", ""): (lambda w: ["convert", w["model"], "--weights-dtype", "bfloat16", "--out", w["root"] / "bf16"],
                      ()),
    ("export", ""): (lambda w: ["export", w["model"], "--to", "hf", "--out", w["root"] / "hf"], ()),
    ("import", ""): (lambda w: ["import", w["root"] / "hf", "--out", w["root"] / "imported"], (("export", ""),)),
    ("export", "--to gguf"): (lambda w: ["export", w["model"], "--to", "gguf", "--out", w["root"] / "m.gguf"], ()),
    ("import", "a GGUF file"): (lambda w: ["import", w["root"] / "m.gguf", "--out", w["root"] / "from-gguf"],
                                (("export", "--to gguf"),)),
}
NOT_RUN: dict = {}  # documented modes the test does not run, and why (every mode runs: ~30 s on 2 cores in all)


@pytest.fixture(scope="module")
def run(world, capsys_module):
    """run(case): the case's `lbdl ... --json` (once per module; the cases it needs first)."""
    done = {}

    def run_case(case):
        if case not in done:
            args, needs = CASES[case]
            for need in needs:
                run_case(need)
            done[case] = capsys_module(*args(world), "--json")
        return done[case]

    return run_case


@pytest.fixture(scope="module")
def capsys_module():
    """An in-process CLI runner for module-scoped runs (capsys is per test): stdout and stderr captured."""
    import contextlib
    import io

    from conftest import CliResult

    from lbdl_cli.cli import main

    def call(*args):
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return CliResult(code, out.getvalue(), err.getvalue())

    return call


def test_the_doc_has_a_section_for_every_command():
    commands = {path for path, _ in COMMANDS_}
    sections = {command for command, _ in DOCUMENTED}
    assert commands - sections == set(), "commands missing from docs/JSON.md"
    assert sections - commands == set(), "docs/JSON.md documents commands that do not exist"
    assert all(DOCUMENTED[case] for case in DOCUMENTED), "a Keys: line without a table"


def test_every_documented_mode_is_run_or_said_why_not():
    assert set(DOCUMENTED) == set(CASES) | set(NOT_RUN)


@pytest.mark.parametrize("case", list(CASES), ids=[" ".join(c).strip().replace(" ", "-") for c in CASES])
def test_the_json_holds_the_documented_keys(run, case):
    r = run(case)
    assert r.code == 0, r.err
    result = r.json()
    table = DOCUMENTED[case]
    missing = [k for k, (_, always) in table.items() if always and k not in result]
    assert not missing, f"{case}: documented keys missing from the output"
    extra = sorted(set(result) - set(table))
    assert not extra, f"{case}: keys not in docs/JSON.md"
    for key, value in result.items():
        kinds = table[key][0]
        wrong = isinstance(value, bool) and bool not in kinds  # JSON's true is no int
        assert isinstance(value, kinds) and not wrong, f"{case} {key}: {type(value).__name__}, documented {kinds}"
