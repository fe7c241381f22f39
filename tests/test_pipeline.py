"""lbdl_cli/pipeline: reading, ordering and checking pipeline files (every problem with its TOML line), steps as
command lines, fingerprints of their inputs' content, the cached run (with a recording runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbdl_cli.cli.pipeline import find_command
from lbdl_cli.pipeline import PipelineError, check, command_lines, parse_set, read_pipeline, run_pipeline
from lbdl_cli.pipeline.run import Hashes, fingerprint


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_order_follows_references_ties_in_file_order(tmp_path):
    p = read_pipeline(write(tmp_path, """
[steps.c]
command = "data info"
shards = "{steps.b.out}"
[steps.b]
command = "data prepare"
files = ["x.txt"]
tokenizer = "{steps.a.out}/tokenizer.model"
out = "b"
[steps.d]
command = "tokenizer inspect"
tokenizer = "{steps.a.out}"
[steps.a]
command = "tokenizer train"
files = ["x.txt"]
out = "a"
[steps.e]
command = "presets"
"""))
    assert p.problems == ()
    # a is the only step with nothing to wait for at first... then b, c (file order: c before d), d, e
    assert p.order == ("a", "b", "c", "d", "e")
    assert p.steps["b"].needs == ("a",) and p.steps["c"].needs == ("b",)


def test_a_cycle_is_named_with_its_line(tmp_path):
    p = read_pipeline(write(tmp_path, """[steps.x]
command = "tokenizer inspect"
tokenizer = "{steps.z.out}"

[steps.y]
command = "data prepare"
files = ["{steps.x.out}"]
out = "y"

[steps.z]
command = "data prepare"
files = ["t.txt"]
tokenizer = "{steps.y.out}"
out = "z"
"""))
    (problem,) = p.problems
    assert "cycle: x -> z -> y -> x" in problem.message and problem.line == 1 and problem.step == "x"
    with pytest.raises(PipelineError, match=r"p.toml:1: step x: the steps form a cycle: x -> z -> y -> x"):
        command_lines(p, find_command)


def test_validate_names_every_problem_with_its_line(tmp_path):
    path = write(tmp_path, """[vars]
work = "w"

[steps.tok]
command = "tokenizer train"
files = ["t.txt"]
vocab_sise = 400
out = "{work}/tok"

[steps.shards]
command = "data prepare"
files = ["t.txt"]
tokenizer = "{steps.tokk.out}"
val_fraction = 2.5
out = "{wrk}/shards"

[steps.bad]
command = "tokenizer trian"

[steps.num]
command = "eval perplexity"
model = "m"
file = "t.txt"
batch_size = "many"
""")
    _, problems = check(read_pipeline(path), find_command)
    found = [(p.line, p.step, p.message) for p in problems]
    assert [(line, step) for line, step, _ in found] == [(7, "tok"), (13, "shards"), (14, "shards"),
                                                         (15, "shards"), (18, "bad"), (24, "num")]
    assert "no field 'vocab_sise'; did you mean vocab_size" in found[0][2]
    assert "missing step 'tokk' (did you mean tok?)" in found[1][2]
    assert "val_fraction must be in" in found[2][2] and "got 2.5" in found[2][2]
    assert "unknown variable {wrk} (did you mean {work}?)" in found[3][2]
    assert "unknown command 'tokenizer trian'" in found[4][2] and "tokenizer train" in found[4][2]
    assert "batch_size" in found[5][2] and "many" in found[5][2]
    assert problems[0].text(path) == f"{path}:7: step tok: " + found[0][2]


def test_missing_required_field_and_group_without_command(tmp_path):
    _, problems = check(read_pipeline(write(tmp_path, """[steps.a]
command = "tokenizer train"
files = ["t.txt"]
[steps.b]
command = "eval"
""")), find_command)
    assert [(p.line, p.step) for p in problems] == [(1, "a"), (5, "b")]
    assert "needs its field out" in problems[0].message
    assert "'eval' is a group of commands; name one: eval perplexity, eval task" in problems[1].message


def test_command_lines_substitute_references_and_keep_file_values(tmp_path):
    p = read_pipeline(write(tmp_path, """[vars]
work = "runs/x y"
[steps.run]
command = "train"
preset = "nano"
data = "shards"
max_steps = 5
lr = 1e-3
compile = false
out = "{work}/run"
[steps.q]
command = "quantize"
model = "{steps.run.out}/best"
type = "q8_0"
out = "{work}/q {{1}}"
force = false
"""))
    lines = command_lines(p, find_command)
    assert lines["run"].argv == ["train", "--data", "shards", "--out", "runs/x y/run", "--preset", "nano",
                                 "--max-steps", "5", "--lr", "0.001", "--no-compile", "--force"]
    # the default command of a group: `lbdl quantize MODEL ...`; force = false: no --force
    assert lines["q"].argv == ["quantize", "runs/x y/run/best", "--out", "runs/x y/q {1}", "--type", "q8_0"]
    assert lines["q"].out == "runs/x y/q {1}" and lines["q"].values == ["runs/x y/run/best", "q8_0"]


def test_set_overrides_a_field_read_as_toml(tmp_path):
    assert parse_set("train.max_steps=20") == ("train", "max_steps", 20)
    assert parse_set('tok.files=["a", "b"]') == ("tok", "files", ["a", "b"])
    assert parse_set("tok.out=runs/x") == ("tok", "out", "runs/x")
    with pytest.raises(PipelineError, match="STEP.field=value"):
        parse_set("max_steps=20")
    path = write(tmp_path, '[steps.a]\ncommand = "tokenizer train"\nfiles = ["t"]\nvocab_size = 400\nout = "o"\n')
    p = read_pipeline(path, ["a.vocab_size=512"])
    assert command_lines(p, find_command)["a"].argv[-3:] == ["--vocab-size", "512", "--force"]
    with pytest.raises(PipelineError, match="no step 'b'"):
        read_pipeline(path, ["b.vocab_size=512"])


def test_fingerprint_follows_input_content_not_own_out(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one")
    (tmp_path / "t.txt").write_text("text")
    path = write(tmp_path, """[steps.a]
command = "data prepare"
files = ["*.txt"]
tokenizer = "in"
out = "out"
""")
    line = command_lines(read_pipeline(path), find_command)["a"]
    hashes = Hashes(tmp_path / "hashes.json")
    first = fingerprint(line, tmp_path, hashes)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("its own output")
    assert fingerprint(line, tmp_path, hashes) == first  # its out is not an input
    (tmp_path / "in" / "a.txt").write_text("two")
    second = fingerprint(line, tmp_path, hashes)
    assert second != first
    (tmp_path / "u.txt").write_text("a new file matching the glob")
    assert fingerprint(line, tmp_path, hashes) not in (first, second)
    (tmp_path / "u.txt").unlink()
    assert fingerprint(line, tmp_path, hashes) == second
    hashes.save()  # the content hashes cached by (size, mtime, inode)
    assert len(json.loads((tmp_path / "hashes.json").read_text())) == 2


class Recorder:
    """A runner that records the command lines and writes each --out as a directory holding the argv."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def __call__(self, argv, workdir):
        self.calls.append(argv)
        if self.fail and self.fail in argv:
            return 2, "", "lbdl: error: it went wrong\n"
        if "--out" in argv:
            out = Path(workdir) / argv[argv.index("--out") + 1]
            out.mkdir(parents=True, exist_ok=True)
            (out / "argv.json").write_text(json.dumps(argv))
        return 0, json.dumps({"perplexity": 3.5, "argv": argv}) + "\n", ""


CHAIN = """[steps.a]
command = "tokenizer train"
files = ["t.txt"]
out = "a"
[steps.b]
command = "data prepare"
files = ["t.txt"]
tokenizer = "{steps.a.out}"
out = "b"
[steps.c]
command = "data info"
shards = "{steps.b.out}"
"""


def test_run_caches_reruns_downstream_and_stops_at_a_failure(tmp_path):
    (tmp_path / "t.txt").write_text("text")
    path = write(tmp_path, CHAIN)
    run = Recorder()
    result = run_pipeline(read_pipeline(path), find_command, runner=run)
    assert result["ok"] and [r["status"] for r in result["steps"]] == ["ran", "ran", "ran"]
    assert result["steps"][2]["numbers"] == {"perplexity": 3.5} and len(run.calls) == 3
    result = run_pipeline(read_pipeline(path), find_command, runner=run)
    assert [r["status"] for r in result["steps"]] == ["cached"] * 3 and len(run.calls) == 3
    # b's option changes: b reruns (its out's content changes), so c does; a stays cached
    result = run_pipeline(read_pipeline(path, ["b.val_fraction=0.2"]), find_command, runner=run)
    assert [r["status"] for r in result["steps"]] == ["cached", "ran", "ran"]
    # a failing step stops the run; the steps before it keep their outputs; a rerun continues from it
    (tmp_path / "t.txt").write_text("changed")
    result = run_pipeline(read_pipeline(path), find_command, runner=Recorder(fail="b"))
    assert [r["status"] for r in result["steps"]] == ["ran", "failed", "not run"]
    assert not result["ok"] and result["failed"] == "b" and result["error"] == "it went wrong"
    assert (tmp_path / "a" / "argv.json").exists() and (tmp_path / "b").exists()
    run = Recorder()
    result = run_pipeline(read_pipeline(path), find_command, runner=run)
    assert [r["status"] for r in result["steps"]] == ["cached", "ran", "ran"] and [c[:2] for c in run.calls] == \
        [["data", "prepare"], ["data", "info"]]


def test_force_only_from_and_outputs_not_ours(tmp_path):
    (tmp_path / "t.txt").write_text("text")
    path = write(tmp_path, CHAIN)
    (tmp_path / "a").mkdir()  # an out that this pipeline did not write
    result = run_pipeline(read_pipeline(path), find_command, runner=Recorder())
    assert result["failed"] == "a" and "exists and was not written by this step" in result["error"]
    assert "--force a" in result["error"]
    statuses = lambda r: [s["status"] for s in r["steps"]]  # noqa: E731
    assert statuses(run_pipeline(read_pipeline(path), find_command, force=("a",), runner=Recorder())) == \
        ["ran", "ran", "ran"]
    assert statuses(run_pipeline(read_pipeline(path), find_command, only=("b",), runner=Recorder())) == \
        ["skipped", "ran", "skipped"]
    assert statuses(run_pipeline(read_pipeline(path), find_command, start="b", runner=Recorder())) == \
        ["skipped", "ran", "ran"]
    assert statuses(run_pipeline(read_pipeline(path), find_command, force_all=True, runner=Recorder())) == \
        ["ran", "ran", "ran"]
    with pytest.raises(PipelineError, match="no step 'z'"):
        run_pipeline(read_pipeline(path), find_command, only=("z",), runner=Recorder())


@pytest.mark.parametrize("text,says", [
    ("", "no steps"),
    ("[steps.a\n", "not valid TOML"),
    ("[pipline]\nx = 1\n", "1: unknown table [pipline]"),
    ('[pipeline]\nwork = "x"\n[steps.a]\ncommand = "presets"\n', "2: unknown key 'work' in [pipeline]"),
])
def test_files_that_cannot_be_read_as_pipelines(tmp_path, text, says):
    with pytest.raises(PipelineError, match=says.replace("[", r"\[").replace("]", r"\]")):
        read_pipeline(write(tmp_path, text))
