"""rag/ as a library: chunk spans, coverage, sizes and overlap; skipped files; BM25 against rank_bm25; RRF known
answers; the index built, updated (embeddings reused), refused on other settings, written atomically; retrieval;
prompt assembly within the context."""

from __future__ import annotations

import json

import pytest
from conftest import assert_round_trips

from lbdl_cli.errors import ConfigError, DataError
from lbdl_cli.rag.assemble import RagConfig, build_rag_prompt, sources_block
from lbdl_cli.rag.chunk import ChunkConfig, Skipped, chunk_text, collect_files, read_document
from lbdl_cli.rag.index import EMBEDDINGS_FILE, Index, IndexConfig, build_index, load_index
from lbdl_cli.rag.lexical import Lexical, terms
from lbdl_cli.rag.retrieve import rrf, search

CORPUS = {
    "cats.md": "# Cats\n\nCats purr when they are content.\nA cat sleeps most of the day.\n",
    "dogs.md": "# Dogs\n\nDogs bark at strangers.\nA dog fetches sticks in the park.\n",
    "fish.txt": "Fish swim in rivers and seas.\nSalmon swim upstream to spawn.\n",
    "birds.txt": "Birds fly south in winter.\nOwls hunt at night.\n",
    "trees.txt": "Oak trees grow slowly.\nPine needles stay green.\n",
    "rocks.txt": "Granite is an igneous rock.\nMarble is a metamorphic rock.\n",
}


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for name, text in CORPUS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def tok(model_dir):
    from lbdl_cli.checkpoint import model_tokenizer

    return model_tokenizer(model_dir)


# --- chunking ---------------------------------------------------------------------------------------------------


def test_configs_round_trip_and_refuse_overlap_at_chunk_size():
    for c in (ChunkConfig(), IndexConfig(model="m", pooling="mean", chunk_tokens=64, overlap=8), RagConfig(k=2)):
        assert_round_trips(c)
    with pytest.raises(ConfigError, match="overlap 32 must be less than chunk_tokens 32"):
        ChunkConfig(chunk_tokens=32, overlap=32)


def test_chunk_spans_known_answer_cut_before_headings(tok):
    text = "# A\n\none two three\nfour five\n\n# B\n\nsix seven\n"
    [a, b] = chunk_text(text, "x.md", "h", tok, ChunkConfig(chunk_tokens=24, overlap=4))
    assert (a.first_line, a.last_line, b.first_line, b.last_line) == (1, 5, 6, 8)
    assert a.text == "# A\n\none two three\nfour five\n\n" and b.text == "# B\n\nsix seven\n"
    assert a.tokens == len(tok.encode(a.text)) and a.path == "x.md" and a.file_sha256 == "h"
    again = chunk_text(text, "x.md", "h", tok, ChunkConfig(chunk_tokens=24, overlap=4))
    assert [c.id for c in again] == [a.id, b.id] and a.id != b.id  # stable


@pytest.mark.parametrize("chunk_tokens,overlap", [(16, 0), (24, 8), (40, 12)])
def test_chunks_cover_every_line_fit_the_budget_and_overlap(tok, chunk_tokens, overlap):
    lines = [f"{i} " + "the " * (i % 3) for i in range(1, 41)]
    lines[10] = ""  # a paragraph break
    lines[20] = "x" * 200  # a line longer than a chunk: cut inside
    text = "\n".join(lines) + "\n"
    chunks = chunk_text(text, "f.txt", "h", tok, ChunkConfig(chunk_tokens=chunk_tokens, overlap=overlap))
    covered = set()
    for c in chunks:
        assert c.tokens <= chunk_tokens and c.tokens == len(tok.encode(c.text))
        covered |= set(range(c.first_line, c.last_line + 1))
    assert covered == set(range(1, 41))  # every line, the blank one too
    long = {n for n, line in enumerate(lines, 1) if len(tok.encode(line + "\n")) > chunk_tokens}
    assert 21 in long
    whole = [(a, b) for a, b in zip(chunks, chunks[1:]) if a.last_line not in long and b.first_line not in long]
    shared = [a.last_line - b.first_line + 1 for a, b in whole]
    if overlap == 0:
        assert all(s <= 0 for s in shared)
    else:  # whole lines of at most `overlap` tokens are shared, where they fit
        for (a, b), s in zip(whole, shared):
            if s > 0:
                common = "".join(text.splitlines(keepends=True)[b.first_line - 1:a.last_line])
                assert len(tok.encode(common)) <= overlap
        assert any(s > 0 for s in shared)
    assert [c.first_line for c in chunks] == sorted(c.first_line for c in chunks)


def test_binary_unreadable_and_empty_files_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"ab\0cd")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / ".hidden").write_text("secret\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_text("junk\n")
    found = collect_files([str(tmp_path)])
    assert [d.path.name for d in found] == ["bin.dat", "empty.txt", "latin1.txt", "ok.txt"]
    reasons = {}
    for d in found:
        try:
            read_document(d.path)
        except Skipped as why:
            reasons[d.path.name] = str(why)
    assert reasons == {"bin.dat": "binary (holds NUL bytes)", "latin1.txt": "not UTF-8 text (byte 3)",
                       "empty.txt": "empty (no text)"}
    with pytest.raises(Skipped, match="unreadable"):
        read_document(tmp_path / "__pycache__")
    with pytest.raises(DataError, match="no documents given"):
        collect_files([])


# --- BM25 -------------------------------------------------------------------------------------------------------


def test_bm25_scores_match_rank_bm25_okapi(tmp_path):
    rank_bm25 = pytest.importorskip("rank_bm25", reason="rank_bm25 (the test extra) is the oracle")
    texts = list(CORPUS.values())
    lex = Lexical.build(texts)
    lex.save(tmp_path / "bm25")
    assert not list((tmp_path / "bm25").glob("*.pkl"))
    loaded = Lexical.load(tmp_path / "bm25", "words")
    oracle = rank_bm25.BM25Okapi([terms(t) for t in texts], k1=1.5, b=0.75)
    # Every query term below is in at most half the chunks, so idf = ln((N - df + 0.5) / (df + 0.5)) >= 0 and
    # neither floor applies (bm25s robertson clamps a negative idf to 0, rank_bm25 to 0.25 x the mean idf).
    for q in ("cats purr", "dog park sticks", "swim upstream", "granite marble rock", "winter owls night"):
        assert loaded.scores(q).tolist() == pytest.approx(oracle.get_scores(terms(q)).tolist(), rel=1e-5)
    assert loaded.scores("zebra").tolist() == [0.0] * len(texts)


def test_rrf_known_answer():
    fused = rrf([[3, 1, 2], [1, 2]], rrf_k=60)
    by = dict(fused)
    assert by[1] == pytest.approx(1 / 62 + 1 / 61) and by[3] == pytest.approx(1 / 61)
    assert [i for i, _ in fused] == [1, 2, 3]  # 2: 1/63 + 1/62 > 3's 1/61
    weighted = rrf([[3, 1, 2], [1, 2]], weights=[2.0, 0.0], rrf_k=60)  # the first ranking alone
    assert [i for i, _ in weighted] == [3, 1, 2] and dict(weighted)[3] == pytest.approx(2 / 61)
    assert dict(rrf([[3, 1, 2], [1, 2]], weights=[2.0, 1.0], rrf_k=1))[1] == pytest.approx(2 / 3 + 1 / 2)
    assert [i for i, _ in rrf([[5], [7]])] == [5, 7]  # a tie goes to the best single rank, then the smaller


# --- the index --------------------------------------------------------------------------------------------------


def test_lexical_index_known_answer_and_files(docs, tmp_path):
    out = tmp_path / "idx"
    r = build_index([str(docs)], out, IndexConfig(chunk_tokens=64, overlap=8))
    assert r["files"] == 6 and sorted(r["added"]) == sorted(str(docs / n) for n in CORPUS) and r["embedded"] == 0
    meta = json.loads((out / "index.json").read_text())
    assert meta["format_version"] == 1 and meta["embedder"] is None and meta["bm25"]["tokens"] == "words"
    assert meta["chunking"] == {"chunk_tokens": 64, "overlap": 8} and not (out / EMBEDDINGS_FILE).exists()
    rows = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"id", "path", "first_line", "last_line", "file_sha256", "tokens", "text"}
    assert sum(len(f["chunks"]) for f in meta["files"].values()) == len(rows)
    [hit] = search(out, "why do dogs bark at strangers", k=1)
    assert hit["path"] == str(docs / "dogs.md") and hit["rank"] == 1 and hit["mode"] == "bm25"
    assert hit["bm25"]["rank"] == 1 and hit["dense"] is None and hit["score"] > 0
    with pytest.raises(DataError, match="has no embeddings"):
        search(out, "dogs", mode="dense")


def test_update_reuses_embeddings_and_rechunks_changed_files(docs, tmp_path, model_dir):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "idx"
    cfg = IndexConfig(model=str(model_dir), chunk_tokens=48, overlap=8)
    first = build_index([str(docs)], out, cfg)
    assert first["embedded"] == first["chunks"] and first["dense"]
    before = {c["text"]: row for c, row in zip(Index(out).chunks, load_file(out / EMBEDDINGS_FILE)["embeddings"])}
    (docs / "fish.txt").write_text("Fish swim in lakes.\nTrout like cold water.\n")
    (docs / "new.txt").write_text("Volcanoes erupt lava.\n")
    second = build_index([str(docs)], out, cfg)
    assert second["changed"] == [str(docs / "fish.txt")] and second["added"] == [str(docs / "new.txt")]
    assert second["unchanged"] == 5 and second["embedded"] == 2  # one chunk each for the changed and new files
    index = Index(out)
    rows = index.embeddings()
    assert rows.shape == (second["chunks"], 32) and torch.allclose(rows.norm(dim=1), torch.ones(len(rows)))
    for c, row in zip(index.chunks, rows):
        if c["text"] in before:
            assert torch.equal(row, before[c["text"]])  # reused, bit for bit
    assert any("Trout" in c["text"] for c in index.chunks) and not any("rivers" in c["text"] for c in index.chunks)
    # a file no longer named is kept, unless pruned
    third = build_index([str(docs / "new.txt")], out, cfg)
    assert third["kept"] == 6 and third["files"] == 7 and third["embedded"] == 0
    pruned = build_index([str(docs / "new.txt")], out, cfg.replace(prune=True))
    assert pruned["files"] == 1 and len(pruned["removed"]) == 6
    # dense retrieval with the index's model: each hit's cosine, best first
    hits = search(out, "lava", k=1, mode="dense")
    assert hits[0]["path"] == str(docs / "new.txt") and hits[0]["dense"]["rank"] == 1


def test_other_settings_are_refused_without_force_and_force_rebuilds(docs, tmp_path, model_dir):
    out = tmp_path / "idx"
    build_index([str(docs)], out, IndexConfig(chunk_tokens=64, overlap=8))
    with pytest.raises(ConfigError, match="chunk_tokens/overlap 64/8, this run gives 32/8.*--force"):
        build_index([str(docs)], out, IndexConfig(chunk_tokens=32, overlap=8))
    with pytest.raises(ConfigError, match="no model \\(lexical only\\).*--force"):
        build_index([str(docs)], out, IndexConfig(chunk_tokens=64, overlap=8, model=str(model_dir)))
    r = build_index([str(docs)], out, IndexConfig(chunk_tokens=32, overlap=8), force=True)
    assert r["unchanged"] == 0 and len(r["added"]) == 6


def test_a_failed_build_leaves_no_index(docs, tmp_path, monkeypatch):
    from lbdl_cli.rag import index as index_module

    out = tmp_path / "idx"

    def broken(self, dir):
        raise OSError("disk full")

    monkeypatch.setattr(index_module.Lexical, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        build_index([str(docs)], out, IndexConfig())
    assert not out.exists() and not list(tmp_path.glob(".idx*"))


def test_newer_format_and_non_index_directories_are_refused(docs, tmp_path):
    out = tmp_path / "idx"
    build_index([str(docs)], out, IndexConfig())
    meta = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(DataError, match="format version 2, newer than this lbdl reads \\(1\\)"):
        search(out, "dogs")
    with pytest.raises(DataError, match="is not a RAG index"):
        Index(docs)


# --- prompts ----------------------------------------------------------------------------------------------------


def _hits(n: int) -> list[dict]:
    return [{"path": f"d{i}.txt", "first_line": 1, "last_line": 2, "text": f"fact number {i} " * 3}
            for i in range(1, n + 1)]


def test_sources_block_labels_each_chunk(tok):
    block = sources_block(_hits(2), "Use these.")
    assert block.startswith("Use these.\n\n[1] d1.txt:1-2\nfact number 1") and "\n\n[2] d2.txt:1-2\n" in block


def test_rag_prompt_drops_the_lowest_ranked_sources_to_fit(tok):
    hits = _hits(4)
    full = build_rag_prompt("what is fact 2?", hits, tok, context=10_000, max_new_tokens=8)
    assert full.sources_dropped == 0 and full.text.endswith("Q: what is fact 2? A:")
    size = full.tokens
    fitted = build_rag_prompt("what is fact 2?", hits, tok, context=size - 5, max_new_tokens=8)
    assert fitted.sources_dropped >= 1 and fitted.tokens <= size - 13
    assert fitted.sources == hits[:len(fitted.sources)]  # the best kept, the lowest-ranked dropped
    assert len(tok.encode(fitted.text, allow_special=True)) == fitted.tokens
    with pytest.raises(ConfigError, match="the question is .* tokens"):
        build_rag_prompt("why " * 200, hits, tok, context=64, max_new_tokens=8)


def test_ranked_takes_the_best_with_ties_in_chunk_order():
    from lbdl_cli.rag.retrieve import _ranked

    scores = [0.0, 2.0, 1.0, 2.0, 3.0, 1.0, 0.0, 1.0]
    assert _ranked(scores, 3) == [(4, 3.0), (1, 2.0), (3, 2.0)]
    assert _ranked(scores, 4) == [(4, 3.0), (1, 2.0), (3, 2.0), (2, 1.0)]  # the tie at the cut: chunk order
    assert _ranked(scores, 20, positive_only=True) == [(4, 3.0), (1, 2.0), (3, 2.0), (2, 1.0), (5, 1.0), (7, 1.0)]
    assert _ranked(scores, 20)[-2:] == [(0, 0.0), (6, 0.0)]


def test_a_dense_index_cuts_chunks_at_what_its_model_embeds_whole(model_dir, tmp_path):
    from lbdl_cli.checkpoint import read_config

    limit = read_config(model_dir)["model"]["block_size"] - 1
    docs = tmp_path / "d.txt"
    docs.write_text("word " * 2000)
    r = build_index([str(docs)], tmp_path / "i", IndexConfig(model=str(model_dir), chunk_tokens=limit + 40,
                                                             overlap=8))
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    assert meta["chunking"] == {"chunk_tokens": limit, "overlap": 8} and r["chunks"] > 1
    assert max(c["tokens"] for c in load_index(tmp_path / "i").chunks) <= limit
