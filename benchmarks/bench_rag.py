"""RAG retrieval on Python's standard library (issue #16): lbdl's BM25, dense and hybrid search, and rank_bm25.

    python benchmarks/bench_rag.py [--max-mb MB] [--queries 300] [--seed 0] [--chunk-tokens 256] [--repeats 3]
                                   [--skip-dense] [--mean] [--no-stripped] [--stripped-dense]
                                   [--threads N] [--json FILE]

The corpus: the `.py` files of this Python's standard library (`sysconfig.get_paths()["stdlib"]`), without the
`test`/`tests` folders, `idlelib` and `site-packages`, in sorted order (with --max-mb, the first files until that
many MB). The queries: every public function with a docstring (a `def` whose name has no leading underscore, at
module level or in a public class, in a module whose file name has no leading underscore), its query the first
sentence of the docstring (first paragraph, whitespace joined, up to the first `.`/`!`/`?` followed by a space or
the end); sentences of fewer than 4 words and sentences that occur more than once in the whole pool are dropped,
then --queries of them are drawn with random.Random(--seed). A query is a hit at k when one of the k retrieved
chunks is of the function's file and its line span holds the function's `def` line (chunks overlap, so either of
two chunks holding it counts).

The docstring is in the corpus, so the chunk that holds the `def` usually holds the query verbatim: that is the
issue's benchmark ("as is"). The harder variant ("docstrings stripped") indexes the same files with every
docstring (module, class, function) replaced by blank lines, line numbers unchanged, and asks the same queries.

Measured (the files given to `build_index` as paths, the index in a temporary directory):
- index build: `build_index(files, dir, IndexConfig(chunk_tokens=...))`, lexical only (chunking + BM25),
  median of --repeats; with the bundled model (`models/default`, eos pooling), once, split by its progress events
  into chunking, model load, embedding and BM25 + writing.
- per-query latency, each query timed --repeats times (median per query), then p50/p95 over the queries:
  `search(index, q, k=10, mode=...)` for bm25/dense/hybrid (the public call, everything included); and for the
  lexical comparison the scoring alone plus a top-10 (numpy argsort, ties by chunk order) for lbdl's
  `Lexical.scores` (bm25s) and `rank_bm25.BM25Okapi.get_scores`, over the same chunks and the same terms
  (`lexical.terms`, lower-cased `\\w+` words), k1 1.5, b 0.75.
- top-10 agreement lbdl vs rank_bm25: the share of queries with the identical top-10 list (same order), the same
  top-10 set, and the mean overlap; again with rank_bm25's idf floor (epsilon 0.25 x mean idf for terms in more
  than half of the chunks) set to lbdl's (0), which isolates the floor.
- recall@1 and @10 for bm25, dense and hybrid (RRF, weights 1:1, rrf_k 60); with --mean, dense and hybrid again
  with mean pooling (a second embedding pass).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
SENTENCE_RE = re.compile(r"(.+?[.!?])(?:\s|$)")
MIN_WORDS = 4
K = 10


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the corpus and the queries ----------------------------------------------------------------------------------


def corpus_files(max_mb: float | None) -> tuple[Path, list[Path]]:
    """The stdlib root and its .py files (sorted; the first ones up to max_mb MB when given)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]) or not path.is_file():
            continue
        if max_mb is not None and total >= max_mb * 1e6:
            break
        files.append(path)
        total += path.stat().st_size
    return root, files


def first_sentence(doc: str) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = SENTENCE_RE.match(para)
    return m.group(1) if m else para


def public_functions(tree: ast.Module):
    """(node) of every public def at module level or in a public class (recursively), not inside a function."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            stack.extend(node.body)


def parse(path: Path) -> ast.Module | None:
    try:
        path.read_bytes().decode("utf-8")  # lbdl indexes UTF-8 text only
        return ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def make_queries(files: list[Path], n: int, seed: int) -> tuple[list[dict], dict]:
    pool = []
    for path in files:
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        tree = parse(path)
        if tree is None:
            continue
        for node in public_functions(tree):
            doc = ast.get_docstring(node)
            if doc:
                pool.append({"file": str(path), "def_line": node.lineno, "name": node.name,
                             "query": first_sentence(doc)})
    counts = Counter(q["query"] for q in pool)
    short = sum(len(q["query"].split()) < MIN_WORDS for q in pool)
    kept = [q for q in pool if len(q["query"].split()) >= MIN_WORDS and counts[q["query"]] == 1]
    chosen = random.Random(seed).sample(kept, min(n, len(kept)))
    return chosen, {"documented_public_functions": len(pool), "short": short,
                    "duplicated": sum(1 for q in pool if len(q["query"].split()) >= MIN_WORDS
                                      and counts[q["query"]] > 1), "eligible": len(kept), "sampled": len(chosen)}


def strip_docstrings(text: str, tree: ast.Module) -> tuple[str, int]:
    """The text with every docstring's lines blanked (line numbers kept); how many were blanked."""
    lines = text.splitlines(keepends=True)
    blanked = 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        a, b = first.lineno - 1, first.end_lineno - 1
        if lines[a][:first.col_offset].strip() or lines[b][first.end_col_offset:].strip() not in ("", ";"):
            continue  # shares a line with code: left as it is
        for i in range(a, b + 1):
            lines[i] = "\n"
        blanked += 1
    return "".join(lines), blanked


def write_stripped(root: Path, files: list[Path], out: Path) -> tuple[list[Path], dict[str, str], int]:
    """The files copied under `out` with their docstrings blanked; original path -> stripped path."""
    copies, where, blanked = [], {}, 0
    for path in files:
        target = out / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        tree = parse(path)
        if tree is not None:
            text, n = strip_docstrings(data.decode("utf-8"), tree)
            blanked += n
            target.write_text(text, encoding="utf-8")
        else:
            target.write_bytes(data)
        copies.append(target)
        where[str(path)] = str(target)
    return copies, where, blanked


# --- measuring ---------------------------------------------------------------------------------------------------


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    i = (len(xs) - 1) * p
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def timed(fn, repeats: int):
    """fn()'s result and its median wall time in ms over `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def latency(ms: list[float]) -> dict:
    return {"p50_ms": percentile(ms, 0.5), "p95_ms": percentile(ms, 0.95), "mean_ms": statistics.fmean(ms)}


def top(scores, k: int = K) -> list[int]:
    import numpy as np

    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k].tolist()


def is_hit(chunk: dict, q: dict, where: dict[str, str] | None = None) -> bool:
    path = where[q["file"]] if where else q["file"]
    return chunk["path"] == path and chunk["first_line"] <= q["def_line"] <= chunk["last_line"]


def recall(ranked: list[list[dict]], queries: list[dict], where=None) -> dict:
    first = [next((r for r, c in enumerate(hits, 1) if is_hit(c, q, where)), None) for hits, q in zip(ranked, queries)]
    n = len(queries)
    return {"recall@1": sum(r == 1 for r in first) / n, "recall@10": sum(r is not None and r <= K for r in first) / n,
            "mrr@10": sum(1 / r for r in first if r is not None and r <= K) / n}


def run_search(index, queries: list[dict], mode: str, repeats: int, embedder=None, where=None) -> dict:
    from lbdl_cli.rag.retrieve import search

    search(index, queries[0]["query"], k=K, mode=mode, embedder=embedder)  # warm: BM25 / embeddings read
    ranked, ms = [], []
    for q in queries:
        hits, t = timed(lambda: search(index, q["query"], k=K, mode=mode, embedder=embedder), repeats)
        ranked.append(hits)
        ms.append(t)
    return {"mode": mode, **recall(ranked, queries, where), **latency(ms), "ranked": ranked}


def build(files: list[Path], out: Path, cfg, events: list | None = None) -> tuple[dict, float]:
    from lbdl_cli.rag.index import build_index

    progress = None
    if events is not None:
        def progress(e):
            events.append((time.perf_counter(), e.stage, e.done, e.total))
    t0 = time.perf_counter()
    result = build_index([str(f) for f in files], out, cfg, force=True, progress=progress)
    return result, time.perf_counter() - t0


def dense_split(events: list, t0: float, t_end: float) -> dict:
    """Seconds of chunking, model load, embedding and the rest (BM25 + writing) of one dense build."""
    chunk_done = max(t for t, s, *_ in events if s == "chunk")
    embed = [t for t, s, *_ in events if s == "embed"]
    if not embed:
        return {"chunk_s": chunk_done - t0, "load_s": 0.0, "embed_s": 0.0, "bm25_write_s": t_end - chunk_done}
    return {"chunk_s": chunk_done - t0, "load_s": embed[0] - chunk_done, "embed_s": embed[-1] - embed[0],
            "bm25_write_s": t_end - embed[-1]}


def lexical_comparison(index, queries: list[dict], repeats: int) -> dict:
    """lbdl's Lexical.scores (bm25s) against rank_bm25's BM25Okapi on the index's chunks and terms."""
    from rank_bm25 import BM25Okapi

    from lbdl_cli.rag.lexical import K1, B, terms

    lex = index.lexical()
    t0 = time.perf_counter()
    okapi = BM25Okapi([terms(c["text"]) for c in index.chunks], k1=K1, b=B)
    okapi_build_s = time.perf_counter() - t0
    ours_ms, theirs_ms, ours_top, theirs_top = [], [], [], []
    lex.scores(queries[0]["query"])
    for q in queries:
        words = terms(q["query"])
        top_ours, t = timed(lambda: top(lex.scores(q["query"])), repeats)
        ours_ms.append(t)
        ours_top.append(top_ours)
        top_theirs, t = timed(lambda: top(okapi.get_scores(words)), repeats)
        theirs_ms.append(t)
        theirs_top.append(top_theirs)
    floored = [w for w, v in okapi.idf.items() if v == okapi.epsilon * okapi.average_idf]
    for w in floored:  # rank_bm25's idf floor set to lbdl's (0): what remains is float rounding and ties
        okapi.idf[w] = 0.0
    unfloored_top = [top(okapi.get_scores(terms(q["query"]))) for q in queries]

    def agree(a, b):
        n = len(a)
        return {"same_list": sum(x == y for x, y in zip(a, b)) / n,
                "same_set": sum(set(x) == set(y) for x, y in zip(a, b)) / n,
                "mean_overlap": statistics.fmean(len(set(x) & set(y)) / K for x, y in zip(a, b))}

    differ = [{"query": q["query"], "lbdl": a, "rank_bm25": b} for q, a, b in zip(queries, ours_top, theirs_top)
              if a != b][:5]
    hits_ours = recall([[index.chunks[i] for i in t] for t in ours_top], queries)
    hits_theirs = recall([[index.chunks[i] for i in t] for t in theirs_top], queries)
    return {"lbdl": latency(ours_ms), "rank_bm25": latency(theirs_ms), "rank_bm25_build_s": okapi_build_s,
            "ratio_p50": statistics.median(theirs_ms) / statistics.median(ours_ms),
            "ratio_p95": percentile(theirs_ms, 0.95) / percentile(ours_ms, 0.95),
            "agreement": agree(ours_top, theirs_top), "agreement_floor_0": agree(ours_top, unfloored_top),
            "floored_terms": len(floored), "recall_lbdl": hits_ours, "recall_rank_bm25": hits_theirs,
            "examples_differing": differ}


# --- the run -----------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=float, default=None, help="only the first files up to this many MB")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="lexical builds; timings per query")
    parser.add_argument("--skip-dense", action="store_true", help="no embedding: BM25 and rank_bm25 only")
    parser.add_argument("--mean", action="store_true", help="also dense/hybrid with mean pooling (a second pass)")
    parser.add_argument("--no-stripped", action="store_true", help="skip the docstrings-stripped variant")
    parser.add_argument("--stripped-dense", action="store_true", help="the stripped variant dense too (embeds again)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from machine import capabilities  # benchmarks/machine.py

    from lbdl_cli.rag.embed import load_embedder
    from lbdl_cli.rag.index import Index, IndexConfig

    started, load_before = time.perf_counter(), load_average()
    versions = f"bm25s {version('bm25s')}, rank_bm25 {version('rank_bm25')}, torch {torch.__version__}"
    print(f"machine: {capabilities()}; {os.cpu_count()} cores; {versions}", flush=True)
    print(f"load average (1, 5, 15 min) before: {load_before}", flush=True)
    root, files = corpus_files(args.max_mb)
    size = sum(f.stat().st_size for f in files)
    queries, qstats = make_queries(files, args.queries, args.seed)
    print(f"corpus: {len(files)} files, {size / 1e6:.2f} MB under {root}; queries: {qstats}", flush=True)
    cfg = IndexConfig(chunk_tokens=args.chunk_tokens)
    res: dict = {"machine": capabilities(), "cores": os.cpu_count(), "versions": versions, "root": str(root),
                 "files": len(files), "bytes": size, "queries": qstats, "chunk_tokens": args.chunk_tokens,
                 "overlap": cfg.overlap, "seed": args.seed, "repeats": args.repeats, "torch_threads":
                 torch.get_num_threads(), "load_before": load_before}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times = []
        for r in range(args.repeats):
            info, t = build(files, tmp / "lex", cfg)
            times.append(t)
            print(f"lexical build #{r}: {t:.1f} s, {info['chunks']} chunks, skipped {len(info['skipped'])}, "
                  f"load {load_average()}", flush=True)
        res["lexical_build"] = {"median_s": statistics.median(times), "runs_s": times, "chunks": info["chunks"],
                                "skipped": info["skipped"]}
        lex = Index(tmp / "lex")
        res["lexical"] = lexical_comparison(lex, queries, args.repeats)
        print(f"lexical: {json.dumps({k: v for k, v in res['lexical'].items() if k != 'examples_differing'})}",
              flush=True)
        modes = {"bm25": run_search(lex, queries, "bm25", args.repeats)}
        print(f"bm25: {modes['bm25']['recall@1']:.3f} / {modes['bm25']['recall@10']:.3f}", flush=True)

        poolings = [] if args.skip_dense else (["eos", "mean"] if args.mean else ["eos"])
        res["dense_build"] = {}
        for pooling in poolings:
            events: list = []
            t0 = time.perf_counter()
            info, t = build(files, tmp / f"dense-{pooling}", cfg.replace(model="default", pooling=pooling), events)
            split = dense_split(events, t0, t0 + t)
            res["dense_build"][pooling] = {"total_s": t, **split, "chunks": info["chunks"],
                                           "embedded": info["embedded"]}
            print(f"dense build ({pooling}): {t:.1f} s {split}, load {load_average()}", flush=True)
            index = Index(tmp / f"dense-{pooling}")
            if [c["id"] for c in index.chunks] != [c["id"] for c in lex.chunks]:
                sys.exit("the dense index's chunks differ from the lexical index's")
            embedder = load_embedder(None, pooling=pooling)
            for mode in ("dense", "hybrid"):
                name = f"{mode} ({pooling})"
                modes[name] = run_search(index, queries, mode, args.repeats, embedder)
                print(f"{name}: {modes[name]['recall@1']:.3f} / {modes[name]['recall@10']:.3f}, "
                      f"p50 {modes[name]['p50_ms']:.2f} ms", flush=True)
        res["modes"] = {k: {kk: vv for kk, vv in v.items() if kk != "ranked"} for k, v in modes.items()}

        if not args.no_stripped:
            copies, where, blanked = write_stripped(root, files, tmp / "stripped")
            info, t = build(copies, tmp / "lex-stripped", cfg)
            stripped = Index(tmp / "lex-stripped")
            res["stripped"] = {"docstrings_blanked": blanked, "chunks": info["chunks"], "build_s": t, "modes": {}}
            runs = {"bm25": run_search(stripped, queries, "bm25", args.repeats, where=where)}
            if args.stripped_dense and not args.skip_dense:
                info, t = build(copies, tmp / "dense-stripped", cfg.replace(model="default"))
                res["stripped"]["dense_build_s"] = t
                index = Index(tmp / "dense-stripped")
                embedder = load_embedder(None)
                for mode in ("dense", "hybrid"):
                    runs[f"{mode} (eos)"] = run_search(index, queries, mode, args.repeats, embedder, where)
            res["stripped"]["modes"] = {k: {kk: vv for kk, vv in v.items() if kk != "ranked"} for k, v in runs.items()}
            print(f"stripped: {res['stripped']}", flush=True)
    res["load_after"], res["seconds"] = load_average(), time.perf_counter() - started
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


def report(res: dict, args) -> None:
    lb, lx = res["lexical_build"], res["lexical"]
    q = res["queries"]
    print()
    print(f"corpus: {res['files']} .py files, {res['bytes'] / 1e6:.2f} MB ({res['root']}, without test/, tests/, "
          f"idlelib/, site-packages/){' (--max-mb ' + str(args.max_mb) + ')' if args.max_mb else ''}; "
          f"{lb['chunks']} chunks of <= {res['chunk_tokens']} tokens (overlap {res['overlap']}), "
          f"{len(lb['skipped'])} files skipped")
    print(f"queries: {q['sampled']} drawn (seed {res['seed']}) from {q['eligible']} eligible of "
          f"{q['documented_public_functions']} documented public functions ({q['short']} under {MIN_WORDS} words, "
          f"{q['duplicated']} with a first sentence found more than once)")
    print(f"machine: {res['machine']}; {res['cores']} cores; {res['versions']}")
    print(f"load average before {res['load_before']}, after {res['load_after']}; {res['seconds']:.0f} s in all")
    print()
    print("| index build | seconds |")
    print("|---|---:|")
    print(f"| lexical (chunking + BM25), median of {len(lb['runs_s'])} | {lb['median_s']:.1f} "
          f"({', '.join(f'{x:.1f}' for x in lb['runs_s'])}) |")
    for pooling, d in res["dense_build"].items():
        print(f"| dense ({pooling}) total, once | {d['total_s']:.1f} |")
        print(f"| - chunking / model load / embedding {d['embedded']} chunks / BM25 + writing | {d['chunk_s']:.1f} / "
              f"{d['load_s']:.1f} / {d['embed_s']:.1f} / {d['bm25_write_s']:.1f} |")
    print()
    print(f"| retrieval (k = {K}, `search()`) | recall@1 | recall@10 | MRR@10 | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in res["modes"].items():
        print(f"| {name} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} | {m['p50_ms']:.2f} | "
              f"{m['p95_ms']:.2f} |")
    if "stripped" in res:
        for name, m in res["stripped"]["modes"].items():
            print(f"| {name}, docstrings stripped | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} | "
                  f"{m['p50_ms']:.2f} | {m['p95_ms']:.2f} |")
    print()
    a, a0 = lx["agreement"], lx["agreement_floor_0"]
    print("| lexical scoring + top-10 | p50 ms | p95 ms | recall@10 |")
    print("|---|---:|---:|---:|")
    print(f"| lbdl `Lexical.scores` (bm25s) | {lx['lbdl']['p50_ms']:.3f} | {lx['lbdl']['p95_ms']:.3f} | "
          f"{lx['recall_lbdl']['recall@10']:.3f} |")
    print(f"| rank_bm25 `BM25Okapi.get_scores` | {lx['rank_bm25']['p50_ms']:.3f} | {lx['rank_bm25']['p95_ms']:.3f} | "
          f"{lx['recall_rank_bm25']['recall@10']:.3f} |")
    print(f"| rank_bm25 / lbdl (target >= 10x) | {lx['ratio_p50']:.1f}x | {lx['ratio_p95']:.1f}x | |")
    print()
    print(f"top-10 agreement: identical list {a['same_list']:.1%}, same set {a['same_set']:.1%}, mean overlap "
          f"{a['mean_overlap']:.1%}; with rank_bm25's idf floor ({lx['floored_terms']} terms) set to 0: identical "
          f"list {a0['same_list']:.1%}, same set {a0['same_set']:.1%}, mean overlap {a0['mean_overlap']:.1%}")


if __name__ == "__main__":
    main()
