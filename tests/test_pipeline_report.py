"""lbdl_cli/pipeline/report.py: a pipeline's report.md + report.json from its steps' results (fake results: no
training), written after a successful run, not rewritten when unchanged; `lbdl plot --png` as a step's out; the
shipped pipelines validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT

from lbdl_cli.cli.pipeline import find_command
from lbdl_cli.pipeline import PipelineError, StepLine, command_lines, read_pipeline, run_pipeline
from lbdl_cli.pipeline import report as report_module
from lbdl_cli.pipeline.report import build_report, markdown

SWEEP = {"model": "pre/best", "eval": "shards/val.txt", "ctx": 64, "tokens": 900,
         "baseline": {"name": "F32", "bits_per_weight": 32.0, "size_bytes": 4000, "perplexity": 50.0,
                      "bits_per_byte": 2.5},
         "rows": [{"name": "Q8_0", "bits_per_weight": 8.5, "size_bytes": 1100, "perplexity": 50.5,
                   "bits_per_byte": 2.51},
                  {"name": "Q4_0", "bits_per_weight": 4.5, "size_bytes": 600, "perplexity": 58.0,
                   "bits_per_byte": 2.6}],
         "files": ["sweep/sweep.json", "sweep/sweep.md", "sweep/sweep.png"]}

# (step, command, given options, result): what the quickstart's steps print, cut to what the report reads
STEPS = [
    ("pretrain", "train", {"preset": "nano"}, {"run": "pre", "steps": 300, "initial_loss": 7.6,
                                               "best_val_loss": 4.1, "tokens": 600, "params": 1000}),
    ("curve", "plot", {"run": "pre", "png": "loss.png"}, {"run": "pre", "png": "loss.png"}),
    ("ppl", "eval perplexity", {"model": "pre/best", "file": "shards/val.txt"},
     {"model": "pre/best", "file": "shards/val.txt", "perplexity": 50.0, "bits_per_byte": 2.5}),
    ("sweep", "quantize sweep", {"model": "pre/best", "eval": "shards/val.txt"}, SWEEP),
    ("lora", "finetune", {"model": "models/default", "method": "lora"},
     {"run": "ft1", "steps": 40, "initial_loss": 9.0, "best_val_loss": 3.0, "tokens": 80, "method": "lora"}),
    ("qlora", "finetune", {"model": "models/default", "method": "qlora"},
     {"run": "ft2", "steps": 40, "initial_loss": 9.5, "best_val_loss": 2.5, "tokens": 80, "method": "qlora"}),
    ("merge", "merge run", {"base": "models/default"}, {"out": "merged", "method": "ties"}),
    ("base_facts", "eval task", {"model": "models/default", "tasks": "data/tasks/facts-test.jsonl"},
     {"model": "models/default", "file": "data/tasks/facts-test.jsonl", "accuracy": 0.0, "correct": 0, "total": 4}),
    ("lora_facts", "eval task", {"model": "models/default", "adapter": "ft1/best",
                                 "tasks": "data/tasks/facts-test.jsonl"},
     {"model": "models/default", "file": "data/tasks/facts-test.jsonl", "accuracy": 0.5, "correct": 2, "total": 4}),
    ("merged_arith", "eval task", {"model": "merged", "tasks": "data/tasks/arithmetic-test.jsonl"},
     {"model": "merged", "file": "data/tasks/arithmetic-test.jsonl", "accuracy": 0.25, "correct": 1, "total": 4}),
    ("fewshot", "generate", {"model": "merged", "args": ["Q: Capital? A:"], "shots": "f.jsonl"},
     {"model": "merged", "prompt": "...", "results": [{"text": " Fizista"}], "answer": None}),
    ("cot", "generate", {"model": "merged", "args": ["Q: 2+2? A:"], "cot": True},
     {"model": "merged", "prompt": "...", "results": [{"text": " 2 and 2 make 4"}], "answer": "4"}),
    ("rag", "rag query", {"index": "idx", "question": "Capital?", "answer_with": "merged"},
     {"model": "merged", "question": "Capital?", "results": [{"text": " Fizista [1]"}], "answer": None,
      "sources": ["[1] data/tasks/facts-docs.jsonl:1-1"]}),
]

SIZES = {"pre/best": (1000, 4200, 32.0), "models/default": (5000, 10_000, 16.0), "merged": (5000, 20_000, 32.0)}


def fake_describe(path: Path) -> dict:
    key = next(k for k in SIZES if str(path).endswith(k))
    params, size, bpw = SIZES[key]
    return {"params": params, "size_bytes": size, "bits_per_weight": bpw}


def fake_run(tmp_path):
    rows = [{"step": s, "command": c, "status": "ran", "seconds": 1.0, "out": None, "numbers": {}, "result": r}
            for s, c, _, r in STEPS]
    lines = {s: StepLine(s, tuple(c.split()), [*c.split()], None, [], g) for s, c, g, _ in STEPS}
    (tmp_path / "ft1" / "best").mkdir(parents=True)
    (tmp_path / "ft1" / "best" / "adapter_model.safetensors").write_bytes(b"x" * 300)
    return rows, lines


def test_every_model_with_size_bits_perplexity_and_scores(tmp_path):
    rows, lines = fake_run(tmp_path)
    report = build_report(rows, lines, tmp_path, title="t", describe=fake_describe)
    by_name = {m["name"]: m for m in report["models"]}
    assert list(by_name) == ["pretrain", "Q8_0", "Q4_0", "default", "lora", "qlora", "merge"]
    pre = by_name["pretrain"]
    # its size and bits per weight from the directory, its params from the run, its perplexity from the eval step
    assert (pre["kind"], pre["path"], pre["params"], pre["size_bytes"], pre["bits_per_weight"]) == \
        ("pretrained", "pre/best", 1000, 4200, 32.0)
    assert pre["perplexity"] == {"shards/val.txt": {"perplexity": 50.0, "bits_per_byte": 2.5, "step": "ppl"}}
    q4 = by_name["Q4_0"]  # a sweep's variant: no directory, its numbers from the sweep's row
    assert (q4["path"], q4["size_bytes"], q4["bits_per_weight"]) == (None, 600, 4.5)
    assert q4["perplexity"]["shards/val.txt"]["perplexity"] == 58.0 and q4["kind"] == "quantized (sweep of pretrain)"
    base, lora, qlora = by_name["default"], by_name["lora"], by_name["qlora"]
    assert base["tasks"] == {"facts-test": {"accuracy": 0.0, "correct": 0, "total": 4, "step": "base_facts"}}
    assert (lora["path"], lora["adapter"], lora["kind"]) == ("models/default", "ft1/best",
                                                             "lora adapter on default")
    assert lora["tasks"]["facts-test"]["accuracy"] == 0.5 and lora["adapter_bytes"] == 300
    assert lora["size_bytes"] == 10_000  # the base's; the adapter's bytes beside it
    assert qlora["kind"] == "qlora adapter on default" and qlora["tasks"] == {}
    merged = by_name["merge"]
    assert (merged["kind"], merged["size_bytes"], merged["tasks"]["arithmetic-test"]["correct"]) == \
        ("merged (ties)", 20_000, 1)
    assert report["pngs"] == {"loss curve": "loss.png", "quantization sweep": "sweep/sweep.png"}
    assert [(s["step"], s["kind"], s["text"], s["answer"]) for s in report["samples"]] == [
        ("fewshot", "few-shot", " Fizista", None), ("cot", "chain-of-thought", " 2 and 2 make 4", "4"),
        ("rag", "retrieval", " Fizista [1]", None)]
    assert [r["step"] for r in report["runs"]] == ["pretrain", "lora", "qlora"]

    md = markdown(report, tmp_path / "runs" / "report", tmp_path)
    assert "| model | kind | params | weights | bits/weight | perplexity val | arithmetic-test accuracy | " \
           "facts-test accuracy |" in md
    assert "| pretrain (`pre/best`) | pretrained | 1,000 | 4.1 KiB | 32.00 | 50.00 (2.500 bits/byte) | - | - |" in md
    assert "| Q4_0 | quantized (sweep of pretrain) | - | 0.6 KiB | 4.50 | 58.00 (2.600 bits/byte) | - | - |" in md
    assert "| lora (`ft1/best`) | lora adapter on default | 5,000 | 9.8 KiB + 0.3 KiB adapter | 16.00 | - | - | " \
           "0.500 (2/4) |" in md
    assert "![loss curve](../../loss.png)" in md and "![quantization sweep](../../sweep/sweep.png)" in md
    assert "- **cot** (chain-of-thought): Q: 2+2? A: -> `2 and 2 make 4` (answer 4)" in md


def test_a_missing_directory_leaves_its_numbers_null(tmp_path):
    rows, lines = fake_run(tmp_path)

    def failing(path):
        raise FileNotFoundError(path)

    report = build_report(rows, lines, tmp_path, describe=failing)
    pre = next(m for m in report["models"] if m["name"] == "pretrain")
    assert (pre["params"], pre["size_bytes"], pre["bits_per_weight"]) == (1000, None, None)
    assert "| pretrain (`pre/best`) | pretrained | 1,000 | - | - |" in markdown(report, tmp_path, tmp_path)


# --- the run writes it --------------------------------------------------------------------------------------------

PIPELINE = """[report]
out = "rep"
title = "My run"

[steps.tok]
command = "tokenizer train"
files = ["t.txt"]
out = "tok"

[steps.train]
command = "train"
data = "{steps.tok.out}"
out = "run"

[steps.curve]
command = "plot"
run = "{steps.train.out}"
png = "loss.png"

[steps.ppl]
command = "eval perplexity"
model = "{steps.train.out}/best"
file = "t.txt"
"""


class Canned:
    """A runner that answers each command with a canned result, writes --out (a directory) and --png (a file)."""

    def __init__(self, perplexity=12.0):
        self.calls, self.perplexity = [], perplexity

    def __call__(self, argv, workdir):
        self.calls.append(argv[0])
        for flag in ("--out", "--png"):
            if flag in argv:
                path = Path(workdir) / argv[argv.index(flag) + 1]
                if flag == "--out":
                    (path / "best").mkdir(parents=True, exist_ok=True)
                    (path / "argv.json").write_text(json.dumps(argv))
                else:
                    path.write_bytes(b"png")
        result = {"train": {"run": "run", "steps": 5, "best_val_loss": 3.0, "params": 99},
                  "plot": {"run": "run", "png": "loss.png"},
                  "eval": {"model": "run/best", "file": "t.txt", "perplexity": self.perplexity}}.get(argv[0], {})
        return 0, json.dumps(result) + "\n", ""


@pytest.fixture
def described(monkeypatch):
    calls = []

    def describe(path):
        calls.append(path)
        return {"params": 100, "size_bytes": 4096, "bits_per_weight": 32.0}

    monkeypatch.setattr(report_module, "describe_model", describe)
    return calls


def test_a_run_writes_the_report_and_an_unchanged_one_leaves_it(tmp_path, described):
    (tmp_path / "t.txt").write_text("text")
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE)
    result = run_pipeline(read_pipeline(path), find_command, runner=Canned())
    assert result["ok"] and result["report"] == {"out": "rep", "files": ["rep/report.md", "rep/report.json"],
                                                 "written": True}
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["title"] == "My run" and saved["pngs"] == {"loss curve": "loss.png"}
    (model,) = saved["models"]
    assert (model["name"], model["params"], model["size_bytes"], model["perplexity"]["t.txt"]["perplexity"]) == \
        ("train", 99, 4096, 12.0)
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# My run\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep")]  # no temporary sibling left
    assert len(described) == 1

    # all cached (the PNG the plot step wrote is its out, not an input): the report is not rebuilt
    result = run_pipeline(read_pipeline(path), find_command, runner=Canned())
    assert [r["status"] for r in result["steps"]] == ["cached"] * 4 and result["report"]["written"] is False
    assert len(described) == 1

    # --only one step: the others' results come from the state; a changed result rewrites the report
    result = run_pipeline(read_pipeline(path), find_command, only=("ppl",), runner=Canned(perplexity=11.0))
    assert [r["status"] for r in result["steps"]] == ["skipped", "skipped", "skipped", "ran"]
    assert result["report"]["written"] is True
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["models"][0]["perplexity"]["t.txt"]["perplexity"] == 11.0
    assert saved["pngs"] == {"loss curve": "loss.png"}


def test_a_failed_run_writes_no_report(tmp_path, described):
    (tmp_path / "t.txt").write_text("text")
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE)

    def failing(argv, workdir):
        return (2, "", "lbdl: error: no\n") if argv[0] == "eval" else Canned()(argv, workdir)

    result = run_pipeline(read_pipeline(path), find_command, runner=failing)
    assert not result["ok"] and "report" not in result and not (tmp_path / "rep").exists()


def test_the_png_of_plot_is_its_out(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE + '\n[steps.again]\ncommand = "tokenizer inspect"\ntokenizer = "{steps.curve.out}"\n')
    lines = command_lines(read_pipeline(path), find_command)
    assert lines["curve"].out == "loss.png" and "loss.png" not in lines["curve"].values
    assert lines["again"].argv == ["tokenizer", "inspect", "loss.png"]


@pytest.mark.parametrize("table, message", [
    ('[report]\nout = "r"\nformat = "html"\n', r"p.toml:3: \[report\] format = 'html': the keys are out"),
    ('[report]\nout = 3\n', r"p.toml:2: \[report\] out = 3"),
])
def test_report_table_problems_name_their_line(tmp_path, table, message):
    path = tmp_path / "p.toml"
    path.write_text(table + PIPELINE.split("\n\n", 1)[1])
    with pytest.raises(PipelineError, match=message):
        read_pipeline(path)


@pytest.mark.parametrize("name, steps", [("quickstart.toml", 23), ("default_model.toml", 5)])
def test_the_shipped_pipelines_validate(cli, name, steps):
    r = cli("pipeline", "validate", ROOT / "pipelines" / name, "--json")
    assert r.code == 0 and r.json()["ok"] and len(r.json()["steps"]) == steps


def test_a_model_directory_is_described_by_its_weights(model_dir):
    from lbdl_cli.checkpoint import model_info

    info = model_info(model_dir)
    described = report_module.describe_model(Path(model_dir))
    assert described == {"params": info["params"], "bits_per_weight": 32.0, "size_bytes": 4 * info["params"]}
