"""`lbdl rag index|query` and `generate --rag` end to end on a tiny corpus and model: the known best chunk, the
answer with its sources, and every bad input as one line and exit 2 with nothing written."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

DOCS = {
    "cats.md": "# Cats\n\nCats purr when they are content.\n",
    "dogs.md": "# Dogs\n\nDogs bark at strangers in the park.\n",
    "fish.txt": "Fish swim in rivers and seas.\n",
    "birds.txt": "Birds fly south in winter.\n",
    "rocks.txt": "Granite is an igneous rock.\n",
}


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for name, text in DOCS.items():
        (root / name).write_text(text)
    (root / "logo.png").write_bytes(b"\x89PNG\0\0")
    return root


@pytest.fixture
def wide_model(tmp_path, model_dir):
    """A tiny model with a context of 256, room for a prompt with sources."""
    from lbdl_cli.checkpoint import save_model

    out = tmp_path / "wide"
    save_model(tiny_model(vocab_size=400, block_size=256), out, tokenizer=model_dir / "tokenizer.model")
    return out


@pytest.fixture
def dense(cli, docs, tmp_path, model_dir):
    out = tmp_path / "dense.rag"
    r = cli("rag", "index", docs, "--out", out, "--model", model_dir, "--chunk-tokens", "48", "--overlap", "8",
            "--json")
    assert r.code == 0, r.err
    return out


def one_line_error(r, says: str) -> None:
    assert r.code == 2 and says in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("lbdl: error: ")


def test_index_then_query_finds_the_known_chunk(cli, docs, tmp_path):
    out = tmp_path / "lex.rag"
    r = cli("rag", "index", docs, "--out", out, "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert result["files"] == 5 and result["chunks"] == 5 and not result["dense"]
    assert result["skipped"] == {str(docs / "logo.png"): "binary (holds NUL bytes)"}
    q = cli("rag", "query", out, "why do dogs bark at strangers?", "--k", "2", "--json").json()
    assert q["mode"] == "bm25" and q["hits"][0]["path"] == str(docs / "dogs.md")
    assert (q["hits"][0]["first_line"], q["hits"][0]["last_line"]) == (1, 3) and q["hits"][0]["rank"] == 1
    shown = cli("rag", "query", out, "dogs bark")
    assert shown.code == 0 and "[1] " in shown.out and f"{docs / 'dogs.md'}:1-3" in shown.out
    again = cli("rag", "index", docs, "--out", out, "--json").json()  # nothing changed: nothing redone
    assert again["unchanged"] == 5 and again["added"] == [] and again["changed"] == []


def test_dense_and_hybrid_queries_and_an_answer_with_sources(cli, dense, wide_model, docs):
    h = cli("rag", "query", dense, "dogs bark", "--json").json()
    assert h["mode"] == "hybrid" and len(h["hits"]) == 4
    assert h["hits"][0]["path"] == str(docs / "dogs.md") or h["hits"][0]["bm25"] is None
    assert all(x["dense"] is not None for x in h["hits"])  # dense ranks every chunk
    d = cli("rag", "query", dense, "dogs bark", "--mode", "dense", "--k", "5", "--json").json()
    scores = [x["score"] for x in d["hits"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    a = cli("rag", "query", dense, "Why do dogs bark?", "--answer-with", wide_model, "--mode", "bm25", "--k", "2",
            "--temperature", "0", "--max-new-tokens", "4", "--json").json()
    assert a["sources"][0] == f"[1] {docs / 'dogs.md'}:1-3" and a["sources_used"] == len(a["sources"])
    assert a["prompt"].startswith("Answer the question using the sources below; cite them as [1], [2].\n\n[1] ")
    assert a["prompt"].endswith("Q: Why do dogs bark? A:") and len(a["results"]) == 1
    g = cli("generate", wide_model, "Why do dogs bark?", "--rag", dense, "--mode", "bm25", "--k", "2",
            "--temperature", "0", "--max-new-tokens", "4", "--json").json()
    assert g["prompt"] == a["prompt"] and g["results"][0]["text"] == a["results"][0]["text"]
    text = cli("generate", wide_model, "Why do dogs bark?", "--rag", dense, "--mode", "bm25", "--k", "1",
               "--temperature", "0", "--max-new-tokens", "4")
    assert text.code == 0 and "sources (bm25):" in text.out and f"[1] {docs / 'dogs.md'}:1-3" in text.out


def test_bad_inputs_are_one_line_errors_and_write_nothing(cli, docs, tmp_path, model_dir, dense):
    (tmp_path / "empty").mkdir()
    one_line_error(cli("rag", "index", tmp_path / "empty", "--out", tmp_path / "a"), "nothing to index")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2")
    one_line_error(cli("rag", "index", tmp_path / "bin", "--out", tmp_path / "b"), "x.dat: binary")
    one_line_error(cli("rag", "index", tmp_path / "nope", "--out", tmp_path / "c"), "does not exist")
    assert not any((tmp_path / n).exists() for n in "abc")
    one_line_error(cli("rag", "query", tmp_path / "missing", "x"), "does not exist; build it with")
    one_line_error(cli("rag", "query", docs, "x"), "is not a RAG index")
    one_line_error(cli("generate", model_dir, "why " * 100, "--rag", dense, "--max-new-tokens", "8"),
                   "the question is")
    other = tmp_path / "other"
    from lbdl_cli.checkpoint import save_model

    save_model(tiny_model(seed=1, vocab_size=400, block_size=64), other, tokenizer=model_dir / "tokenizer.model")
    r = cli("rag", "query", dense, "dogs", "--mode", "dense", "--model", other)
    one_line_error(r, "was embedded with")
    meta = json.loads((dense / "index.json").read_text())
    assert meta["embedder"]["sha256"][:12] in r.err and "sha256 " in r.err.split("query model")[1]
    (dense / "index.json").write_text(json.dumps({**meta, "format_version": 9}))
    one_line_error(cli("rag", "query", dense, "dogs"), "format version 9, newer than this lbdl reads")
    one_line_error(cli("rag", "index", docs, "--out", tmp_path / "lex", "--overlap", "300"),
                   "overlap 300 must be less than chunk_tokens 256")
    one_line_error(cli("generate", model_dir, "hi", "--k", "2"), "need --rag INDEX")
