"""Retrieval over an index: BM25, dense (cosine of unit embeddings) and hybrid (weighted reciprocal-rank fusion).

    from lbdl_cli.rag.retrieve import search
    hits = search("docs.rag", "how do I merge adapters?", k=4)           # hybrid when the index has embeddings
    hits[0]["path"], hits[0]["first_line"], hits[0]["score"], hits[0]["bm25"]["rank"]

Hybrid fuses the two rankings, each taken to depth max(4k, 50), by reciprocal-rank fusion (Cormack et al.
2009): a chunk's score is the sum over the rankings it appears in of weight / (rrf_k + rank), ranks from 1.
A BM25 ranking holds only the chunks that share a term with the question.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..errors import ConfigError
from .embed import same_model
from .index import Index

MODES = ("bm25", "dense", "hybrid")


def rrf(rankings: Sequence[Sequence[int]], weights: Sequence[float] | None = None, rrf_k: int = 60) \
        -> list[tuple[int, float]]:
    """Weighted reciprocal-rank fusion: (item, score) best first; ties go to the item with the best single rank,
    then to the smaller item."""
    weights = weights if weights is not None else [1.0] * len(rankings)
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking, w in zip(rankings, weights):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + w / (rrf_k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


def _ranked(scores, depth: int, positive_only: bool = False) -> list[tuple[int, float]]:
    """(chunk, score) of the `depth` best scores, best first, ties by chunk order. A partition picks the
    candidates (every score tied with the depth-th best among them) so that only they are sorted."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    candidates = np.flatnonzero(s > 0) if positive_only else np.arange(len(s))
    if len(candidates) > depth:
        cut = -np.partition(-s[candidates], depth - 1)[depth - 1]  # the depth-th best score
        candidates = candidates[s[candidates] >= cut]
    order = sorted(candidates.tolist(), key=lambda i: (-s[i], i))[:depth]
    return [(i, float(s[i])) for i in order]


def default_mode(index: Index) -> str:
    return "hybrid" if index.has_embeddings else "bm25"


def check_embedder(index: Index, embedder) -> None:
    """The embedder is the model the index was embedded with (weights, adapter, pooling), or a ConfigError naming
    both."""
    want, got = index.embedder, embedder.identity
    if not same_model(want, got):
        def name(e):
            adapter = f", adapter {e['adapter_sha256'][:12]}" if e.get("adapter_sha256") else ""
            return f"sha256 {e['sha256'][:12]}{adapter}, {e['pooling']} pooling"

        raise ConfigError(f"index {index.dir} was embedded with {want['model']} ({name(want)}) but the query model "
                          f"{got['model']} is {name(got)}; query with the index's model or rebuild the index with "
                          f"--model {got['model']}")


def index_embedder(index: Index, model: str | os.PathLike | None = None, compute_dtype: str = "auto",
                   device: str = "auto", progress=None):
    """The embedder for a dense query of `index`: `model` (default: the model the index recorded, its adapter
    with it) with the index's pooling, checked to be the index's model."""
    from .embed import load_embedder

    recorded = index.embedder
    if recorded is None:
        raise ConfigError(f"index {index.dir} has no embeddings (built without --model); use --mode bm25, or "
                          f"rebuild it with --model MODEL --force")
    adapter = recorded.get("adapter") if model is None else None
    embedder = load_embedder(model if model is not None else recorded["model"], adapter, recorded["pooling"],
                             compute_dtype, device, progress)
    check_embedder(index, embedder)
    return embedder


def search(index: Index | str | os.PathLike, question: str, k: int = 4, mode: str | None = None, embedder=None,
           weights: Sequence[float] = (1.0, 1.0), rrf_k: int = 60) -> list[dict]:
    """The `k` chunks that best answer `question`, best first: each chunk's fields with `rank` (from 1), `score`
    (the mode's), and `bm25` / `dense` ({rank, score} in that ranking, or None where the chunk is not in it).
    mode None: hybrid when the index has embeddings, else bm25. Dense and hybrid take `embedder` (default: the
    index's own model, loaded) and refuse one that is not the index's model."""
    index = index if isinstance(index, Index) else Index(index)
    mode = mode or default_mode(index)
    if mode not in MODES:
        raise ConfigError(f"unknown retrieval mode {mode!r}; choose {', '.join(MODES)}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if not question.strip():
        raise ConfigError("the question is empty; give a question to retrieve sources for")
    depth = k if mode != "hybrid" else max(4 * k, 50)
    lists: dict[str, list[tuple[int, float]]] = {}
    if mode in ("bm25", "hybrid"):
        lists["bm25"] = _ranked(index.lexical().scores(question), depth, positive_only=True)
    if mode in ("dense", "hybrid"):
        vectors = index.embeddings()  # a lexical-only index is refused here
        if embedder is None:
            embedder = index_embedder(index)
        check_embedder(index, embedder)
        q = embedder.embed([question])[0]
        lists["dense"] = _ranked((vectors @ q).numpy(), depth)
    if mode == "hybrid":
        fused = rrf([[i for i, _ in lists["bm25"]], [i for i, _ in lists["dense"]]], weights, rrf_k)[:k]
    else:
        fused = lists[mode][:k]
    where = {name: {i: (r, s) for r, (i, s) in enumerate(ranked, 1)} for name, ranked in lists.items()}
    hits = []
    for rank, (i, score) in enumerate(fused, 1):
        hit = {**index.chunks[i], "rank": rank, "score": score, "mode": mode}
        for name in ("bm25", "dense"):
            found = where.get(name, {}).get(i)
            hit[name] = {"rank": found[0], "score": found[1]} if found else None
        hits.append(hit)
    return hits
