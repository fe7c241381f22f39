"""lbdl pipeline run|validate|show end to end, each step a real `lbdl` process: a tokenizer, shards, and two
steps that read them, on 20 KB of text."""

from __future__ import annotations

import shlex

import pytest
from conftest import ROOT

PIPELINE = """[vars]
work = "w"

[steps.shards]
command = "data prepare"
files = ["s.txt"]
tokenizer = "{steps.tok.out}"
out = "{work}/shards"

[steps.tok]
command = "tokenizer train"
files = ["s.txt"]
vocab_size = 400
out = "{work}/tok"

[steps.info]
command = "data info"
shards = "{steps.shards.out}"

[steps.inspect]
command = "tokenizer inspect"
tokenizer = "{steps.tok.out}"
"""


@pytest.fixture
def pipeline(tmp_path):
    (tmp_path / "s.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE)
    return path


def statuses(result) -> dict:
    return {row["step"]: row["status"] for row in result.json()["steps"]}


def test_run_then_all_cached_then_only_downstream_of_a_change(cli, pipeline):
    r = cli("pipeline", "run", pipeline, "--json")
    assert r.code == 0, r.err
    assert statuses(r) == {"tok": "ran", "shards": "ran", "info": "ran", "inspect": "ran"}
    steps = {row["step"]: row for row in r.json()["steps"]}
    assert steps["tok"]["numbers"] == {"vocab_size": 400} and steps["info"]["result"]["vocab_size"] == 400
    assert (pipeline.parent / "w" / "shards" / "train.bin").exists()

    r = cli("pipeline", "run", pipeline, "--json")
    assert statuses(r) == {"tok": "cached", "shards": "cached", "info": "cached", "inspect": "cached"}
    assert r.json()["steps"][2]["result"]["vocab_size"] == 400  # the cached step's result is kept

    r = cli("pipeline", "run", pipeline, "--set", "shards.val_fraction=0.2", "--json")
    assert statuses(r) == {"tok": "cached", "shards": "ran", "info": "ran", "inspect": "cached"}

    # forcing tok rewrites it (its report's timings change), so shards reruns; shards come out identical, so
    # info, which reads only them, stays cached: the cache follows content
    r = cli("pipeline", "run", pipeline, "--set", "shards.val_fraction=0.2", "--force", "tok", "--json")
    assert statuses(r) == {"tok": "ran", "shards": "ran", "info": "cached", "inspect": "ran"}

    r = cli("pipeline", "run", pipeline, "--only", "info", "--json")  # the file's own val_fraction again
    assert statuses(r) == {"tok": "skipped", "shards": "skipped", "info": "ran", "inspect": "skipped"}
    r = cli("pipeline", "run", pipeline, "--from", "info", "--json")
    assert statuses(r) == {"tok": "skipped", "shards": "skipped", "info": "ran", "inspect": "ran"}

    r = cli("pipeline", "run", pipeline)  # the human summary
    assert r.code == 0 and "tok" in r.out and "cached" in r.out and "vocab_size 400" in r.out


def test_a_failing_step_stops_the_run_and_a_rerun_continues(cli, pipeline):
    r = cli("pipeline", "run", pipeline, "--set", 'shards.files=["missing.txt"]', "--json")
    assert r.code == 1
    assert statuses(r) == {"tok": "ran", "shards": "failed", "info": "not run", "inspect": "not run"}
    assert r.err.strip() == ("lbdl: step shards failed: file not found: missing.txt (fix it and run again: the "
                             "steps before it are cached)")
    assert len(r.err.strip().splitlines()) == 1
    assert (pipeline.parent / "w" / "tok" / "tokenizer.model").exists()
    assert not (pipeline.parent / "w" / "shards").exists()
    r = cli("pipeline", "run", pipeline, "--json")
    assert statuses(r) == {"tok": "cached", "shards": "ran", "info": "ran", "inspect": "ran"}


def test_dry_run_prints_the_shell_commands(cli, pipeline):
    r = cli("pipeline", "run", pipeline, "--dry-run")
    assert r.code == 0
    assert r.out.splitlines() == [
        f"cd {shlex.quote(str(pipeline.parent))}",
        "lbdl tokenizer train s.txt --out w/tok --vocab-size 400 --force",
        "lbdl data prepare s.txt --tokenizer w/tok --out w/shards --force",
        "lbdl data info w/shards",
        "lbdl tokenizer inspect w/tok",
    ]
    assert not (pipeline.parent / "w").exists()
    r = cli("pipeline", "run", pipeline, "--dry-run", "--from", "info", "--json")
    assert r.json()["commands"][1:] == ["lbdl data info w/shards", "lbdl tokenizer inspect w/tok"]


def test_show_says_what_would_run(cli, pipeline):
    r = cli("pipeline", "show", pipeline, "--json")
    rows = {row["step"]: row for row in r.json()["steps"]}
    assert [row["step"] for row in r.json()["steps"]] == ["tok", "shards", "info", "inspect"]
    assert rows["shards"]["needs"] == ["tok"] and rows["tok"]["status"] == "run" and rows["tok"]["why"] == "never ran"
    assert cli("pipeline", "run", pipeline).code == 0
    r = cli("pipeline", "show", pipeline, "--set", "tok.vocab_size=420", "--json")
    assert {row["step"]: row["status"] for row in r.json()["steps"]} == {
        "tok": "run", "shards": "after upstream", "info": "after upstream", "inspect": "after upstream"}
    r = cli("pipeline", "show", pipeline, "--force", "--json")  # a bare --force: every step
    assert {row["why"] for row in r.json()["steps"]} == {"forced"}


def test_validate(cli, pipeline, tmp_path):
    r = cli("pipeline", "validate", pipeline)
    assert r.code == 0 and "4 steps, no problems" in r.out
    bad = tmp_path / "bad.toml"
    bad.write_text(PIPELINE.replace("vocab_size = 400", "vocab_size = 400\nvocab = 3").replace(
        '"data info"', '"data inf"'))
    r = cli("pipeline", "validate", bad)
    assert r.code == 2 and r.err.strip() == f"lbdl: error: 2 problems in {bad} (listed above)"
    assert r.out.splitlines() == [
        f"{bad}:14: step tok: `lbdl tokenizer train` has no field 'vocab'; did you mean vocab_size?",
        f"{bad}:18: step info: unknown command 'data inf': `lbdl data` has no 'inf' (did you mean 'data info'?)"]
    r = cli("pipeline", "run", bad)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert f"{bad}:14: step tok:" in r.err and "(and 1 more: see `lbdl pipeline validate`)" in r.err


def test_the_example_pipeline_is_valid(cli):
    r = cli("pipeline", "validate", ROOT / "pipelines" / "example.toml", "--json")
    assert r.code == 0 and r.json()["steps"] == ["tok", "shards", "train", "eval"]
