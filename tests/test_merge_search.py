"""`lbdl merge search`: CMA-ES over merge configs scored on task files (lbdl_cli/merge/search.py)."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from lbdl_cli.checkpoint import save_model
from lbdl_cli.merge.score import Scorer, read_eval, score_dir
from lbdl_cli.merge.search import SearchConfig, Space, search
from lbdl_cli.progress import collect

PROMPTS = ["To be", "Good morrow", "What say you", "Come hither", "Alas", "Hark", "Speak", "Farewell"]
TASKS = {"a": " the king shall die", "b": " my lord is gone"}


def weights(d):
    return load_file(str(d / "model.safetensors"))


def finetune(model, tok, records, steps=40):
    """A few Adam steps on the completion loss of `records`: a real task vector."""
    from lbdl_cli.records import encode_records, pack_examples

    ids, labels = pack_examples(encode_records(records, tok, fmt="completion"), 16, tok.eos_id, pack=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=labels[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def family(tok_dir, tmp_path_factory):
    """A tiny base, two fine-tunes of it on different completions (task files a.jsonl and b.jsonl)."""
    from tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("search")
    tokenizer = tok_dir / "tokenizer.model"
    tok = Tokenizer.load(tokenizer)
    shape = dict(vocab_size=400, block_size=64, n_layer=3)
    save_model(tiny_model(**shape), root / "base", tokenizer=tokenizer)
    for name, completion in TASKS.items():
        records = [{"prompt": p, "completion": completion, "answer": completion.strip()} for p in PROMPTS]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        save_model(finetune(tiny_model(**shape), tok, records), root / f"ft_{name}", tokenizer=tokenizer)
    return root


def args(family, out, *extra):
    return ["merge", "search", "--base", family / "base", "--model", family / "ft_a", "--model", family / "ft_b",
            "--eval", family / "a.jsonl", "--eval", family / "b.jsonl", "--out", out, *extra]


def test_the_spaces_map_vectors_to_merge_configs():
    p = Space("params", "ties", ("m1", "m2"), 3)
    assert p.dim == 8 and p.mean() == [1.0] * 6 + [0.5] * 2
    cfg = p.config([0.1, 0.2, 0.3, 1.1, 1.2, 1.3, 0.4, 0.9], "b", seed=7)
    assert cfg.method == "ties" and cfg.base == "b" and cfg.seed == 7
    assert [(m.model, m.weight, m.density) for m in cfg.models] == [("m1", [0.1, 0.2, 0.3], 0.4),
                                                                    ("m2", [1.1, 1.2, 1.3], 0.9)]
    layers = Space("layers", "ties", ("m1", "m2"), 3)  # per block: scores of base, m1, m2
    x = [0.1, 0.9, 0.2,  0.3, 0.3, 0.8,  0.7, 0.2, 0.2]
    assert layers.describe(x) == {"models": [{"model": "m1", "weight": [1.0, 0.0, 0.0], "density": None},
                                             {"model": "m2", "weight": [0.0, 1.0, 0.0], "density": None}],
                                  "blocks": ["m1", "m2", "base"]}
    assert layers.describe(layers.mean())["blocks"] == ["base"] * 3  # a tie goes to the first: the base
    both = Space("both", "dare_ties", ("m1", "m2"), 2)  # per block: merge, base, m1, m2; then weights, densities
    x = [0.9, 0.1, 0.1, 0.1,  0.1, 0.1, 0.1, 0.8,  0.5, 0.6,  0.7, 0.8,  0.3, 0.4]
    assert both.describe(x) == {"models": [{"model": "m1", "weight": [0.5, 0.0], "density": [0.3, 1.0]},
                                           {"model": "m2", "weight": [0.7, 1.0], "density": [0.4, 1.0]}],
                                "blocks": ["merge", "m2"]}
    assert both.describe(both.mean())["blocks"] == ["merge", "merge"]
    assert [m.weight for m in both.config(both.mean(), "b", 0).models] == [[1.0, 1.0], [1.0, 1.0]]


def test_the_scores_are_the_completion_nll_and_exact_match(family):
    """Known answers: each fine-tune solves its own task and not the other; the loss is the mean NLL of the
    completion's tokens and the <eos> after it, computed here record by record."""
    import torch.nn.functional as F

    from lbdl_cli.checkpoint import load_model, model_tokenizer

    files = [str(family / "a.jsonl"), str(family / "b.jsonl")]
    accuracy = score_dir(family / "ft_a", files, SearchConfig(metric="accuracy", limit=3))
    assert accuracy == {"scores": dict(zip(files, [1.0, 0.0])), "objective": 0.5}
    model, config = load_model(family / "ft_b")
    tok = model_tokenizer(family / "ft_b", config)
    total = count = 0
    for p in PROMPTS[:3]:
        prompt, completion = tok.encode(p), tok.encode(TASKS["a"]) + [tok.eos_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids[:, :-1])[0, len(prompt) - 1:]  # the positions that predict the completion
        total += float(F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum"))
        count += len(completion)
    loss = score_dir(family / "ft_b", files[:1], SearchConfig(limit=3))
    assert loss["objective"] == pytest.approx(total / count, rel=1e-5) and loss["objective"] > 1.0


def test_params_search_improves_reproduces_and_reruns(cli, family, tmp_path):
    out = tmp_path / "s"
    r = cli(*args(family, out, "--trials", "9", "--population", "4", "--seed", "1", "--json"))
    assert r.code == 0, r.err
    result = r.json()
    doc = json.loads((out / "search.json").read_text())
    trials = doc["trials"]
    assert len(trials) == 9 == result["trials"] and [t["trial"] for t in trials] == list(range(9))
    assert [t["generation"] for t in trials] == [0, 1, 1, 1, 1, 2, 2, 2, 2]  # generation 1 was told
    first = trials[0]  # the plain task-arithmetic merge
    assert [m["weight"] for m in first["models"]] == [[1.0] * 3] * 2
    objectives = [t["objective"] for t in trials]
    assert doc["best"]["objective"] == min(objectives) == result["best_objective"]
    assert result["best_objective"] < result["initial_objective"] == first["objective"]
    for t in trials:
        assert t["objective"] == pytest.approx(sum(t["scores"].values()) / 2, rel=1e-12)
        assert all(0 <= w <= 1.5 for m in t["models"] for w in m["weight"])
    assert len(set(map(tuple, (t["x"] for t in trials)))) == 9
    assert not (tmp_path / "s.trials.jsonl").exists()
    table = (out / "trials.md").read_text().splitlines()
    assert sum(line.startswith("| ") and not line.startswith("| trial") for line in table) == 9
    assert f"| {doc['best']['trial']} (best) |" in (out / "trials.md").read_text()
    # the directory is the best trial's merge: the same score, and merge.json reruns it to the same tensors
    rescored = score_dir(out, [str(family / "a.jsonl"), str(family / "b.jsonl")])
    assert rescored["objective"] == pytest.approx(doc["best"]["objective"], rel=1e-6)
    merge_cfg = json.loads((out / "merge.json").read_text())
    assert merge_cfg["method"] == "task_arithmetic" and all(len(m["weight"]) == 3 for m in merge_cfg["models"])
    assert [m["weight"] for m in merge_cfg["models"]] == [m["weight"] for m in doc["best"]["models"]]
    assert cli("merge", "--config", out / "merge.json", "--out", tmp_path / "again").code == 0
    a, b = weights(out), weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same seed through the library: the same file; progress per trial
    events = []
    cfg = SearchConfig(trials=9, population=4, seed=1)
    search(str(family / "base"), [str(family / "ft_a"), str(family / "ft_b")],
           [str(family / "a.jsonl"), str(family / "b.jsonl")], cfg, out=tmp_path / "s2", progress=collect(events))
    assert (tmp_path / "s2" / "search.json").read_text() == (out / "search.json").read_text()
    assert [e.done for e in events if e.stage == "search"] == list(range(1, 10))
    other = search(str(family / "base"), [str(family / "ft_a"), str(family / "ft_b")],
                   [str(family / "a.jsonl"), str(family / "b.jsonl")], cfg.replace(seed=2, trials=2),
                   out=tmp_path / "s3")
    other_x = [t["x"] for t in json.loads((tmp_path / "s3" / "search.json").read_text())["trials"]]
    assert other["trials"] == 2 and other_x[0] == trials[0]["x"] and other_x[1] != trials[1]["x"]


def test_layers_search_copies_whole_blocks(cli, family, tmp_path):
    out = tmp_path / "l"
    r = cli(*args(family, out, "--space", "layers", "--trials", "6", "--population", "4", "--seed", "3",
                  "--limit", "4", "--json"))
    assert r.code == 0, r.err
    doc = json.loads((out / "search.json").read_text())
    sources = {"base": weights(family / "base"), str(family / "ft_a"): weights(family / "ft_a"),
               str(family / "ft_b"): weights(family / "ft_b")}
    for t in doc["trials"]:
        for m in t["models"]:
            assert m["weight"] == [1.0 if b == m["model"] else 0.0 for b in t["blocks"]]
    assert doc["trials"][0]["blocks"] == ["base"] * 3
    assert len({tuple(t["blocks"]) for t in doc["trials"]}) > 1
    blocks = doc["best"]["blocks"]
    merged = weights(out)
    for name, tensor in merged.items():
        i = int(name.split(".")[1]) if name.startswith("blocks.") else (0 if "emb" in name else 2)
        for source, w in sources.items():
            if source == blocks[i]:
                torch.testing.assert_close(tensor, w[name], rtol=0, atol=1e-6)
            elif not torch.equal(w[name], sources[blocks[i]][name]):
                assert not torch.allclose(tensor, w[name], rtol=0, atol=1e-6), (name, source)
    assert score_dir(out, [str(family / "a.jsonl"), str(family / "b.jsonl")],
                     SearchConfig(limit=4))["objective"] == pytest.approx(doc["best"]["objective"], rel=1e-6)


def test_both_space_with_ties_scored_by_accuracy(cli, family, tmp_path):
    out = tmp_path / "both"
    r = cli(*args(family, out, "--space", "both", "--method", "ties", "--metric", "accuracy", "--limit", "1",
                  "--trials", "3", "--json"))
    assert r.code == 0, r.err
    doc = json.loads((out / "search.json").read_text())
    assert doc["trials"][0]["blocks"] == ["merge"] * 3
    for t in doc["trials"]:
        assert all(0 <= s <= 1 for s in t["scores"].values())
        for m in t["models"]:
            for b, d in zip(t["blocks"], m["density"]):
                assert d == 1.0 if b != "merge" else 0.05 <= d <= 1
    assert doc["best"]["objective"] == max(t["objective"] for t in doc["trials"]) > 0  # a candidate solved one
    assert json.loads((out / "merge.json").read_text())["method"] == "ties"
    rescored = score_dir(out, [str(family / "a.jsonl"), str(family / "b.jsonl")],
                         SearchConfig(metric="accuracy", limit=1))
    assert rescored["objective"] == doc["best"]["objective"]


def test_a_killed_search_resumes_from_its_trials(family, tmp_path, monkeypatch):
    inputs = (str(family / "base"), [str(family / "ft_a"), str(family / "ft_b")], [str(family / "a.jsonl")])
    cfg = SearchConfig(trials=5, population=4, seed=5, limit=4)
    search(*inputs, cfg, out=tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at_4(event):
        if event.stage == "search" and event.done == 3:
            raise Killed

    with pytest.raises(Killed):
        search(*inputs, cfg, out=tmp_path / "r", progress=kill_at_4)
    journal = tmp_path / "r.trials.jsonl"
    assert not (tmp_path / "r").exists() and len(journal.read_text().splitlines()) == 1 + 3
    scored = []
    real = Scorer.__call__
    monkeypatch.setattr(Scorer, "__call__", lambda self, model: scored.append(1) or real(self, model))
    result = search(*inputs, cfg, out=tmp_path / "r")
    assert result["resumed"] == 3 and len(scored) == 2 and not journal.exists()
    assert (tmp_path / "r" / "search.json").read_text() == (tmp_path / "whole" / "search.json").read_text()
    # a journal of other settings is not replayed
    journal.write_text(json.dumps({"search": {"seed": 99}}) + "\n")
    scored.clear()
    assert search(*inputs, cfg.replace(trials=2), out=tmp_path / "r2")["resumed"] == 0 and len(scored) == 2


def test_refusals_write_nothing(cli, family, tok_dir, tmp_path, monkeypatch):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "To be", "text": "or not"}) + "\n")
    save_model(tiny_model(vocab_size=400, block_size=64, n_layer=3, n_embd=48), tmp_path / "wide",
               tokenizer=tok_dir / "tokenizer.model")
    out = tmp_path / "out"
    base = ["merge", "search", "--base", family / "base", "--model", family / "ft_a"]
    good = ["--eval", family / "a.jsonl", "--out", out]
    cases = [
        ([*base, "--out", out], "give --eval TASKS.jsonl"),
        ([*base, "--eval", tmp_path / "bad.jsonl", "--out", out], 'bad.jsonl:1: the loss needs a "prompt" text'),
        ([*base, *good, "--metric", "accuracy", "--eval", tmp_path / "bad.jsonl"], 'bad.jsonl:1: no "answer"'),
        ([*base, *good, "--trials", "0"], "trials must be in [1,"),
        ([*base, *good, "--space", "nope"], "space"),
        ([*base, *good, "--method", "slerp"], "method"),
        ([*base, "--model", tmp_path / "wide", *good], "is another architecture than"),
        ([*base, "--model", family / "ft_a", *good], "--model"),
        (["merge", "search", "--base", family / "base", *good], "give --model DIR"),
    ]
    for case, says in cases:
        r = cli(*case)
        assert r.code == 2 and says in r.err and r.err.count("\n") == 1, (case, r.err)
        assert not out.exists() and not (tmp_path / "out.trials.jsonl").exists()
    monkeypatch.setitem(__import__("sys").modules, "cmaes", None)  # `from cmaes import CMA` raises ImportError
    r = cli(*base, *good)
    assert r.code == 2 and "needs the search extra: pip install 'lbdl[search]'" in r.err and not out.exists()


def test_eval_records_take_an_answer_as_the_completion(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "2+3=", "answer": 5}, {"prompt": "x", "completion": "y", "answer": "z"}, {"prompt": "p",
                                                                                             "answer": "q"})))
    assert read_eval(str(tmp_path / "t.jsonl"), "loss") == [{"prompt": "2+3=", "completion": "5"},
                                                            {"prompt": "x", "completion": "y"},
                                                            {"prompt": "p", "completion": "q"}]
    assert len(read_eval(str(tmp_path / "t.jsonl"), "loss", limit=2)) == 2


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from lbdl_cli.cli import main\n"
            "try:\n    main(['merge', 'search', '--help'])\nexcept SystemExit as e:\n    assert e.code in (0, None)\n"
            "print('torch' in sys.modules, 'cmaes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--space [params|layers|both]" in out and out.split()[-2:] == ["False", "False"]
