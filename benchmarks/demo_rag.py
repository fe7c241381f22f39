"""LBDL 8.1 at small scale: retrieval-augmented answers about facts the model never saw.

    python benchmarks/demo_rag.py WORKDIR [--fresh-seed 8101] [--train-worlds 20] [--reader-steps 1200]
        [--batch-size 8] [--lr 2e-3] [--variants 1] [--closed-share 0.1] [--embed-steps 150]
        [--embed-batch-size 32] [--embed-lr 1e-4] [--k 4] [--seed 0] [--json FILE]

OMP_NUM_THREADS defaults to 1 here (this script's torch and every `lbdl` it runs).

Every model and index is made by a subprocess of the `lbdl` CLI (`--json`, its last line read); retrieval over
the many questions goes through the library (`lbdl_cli.rag.retrieve.search`, what `lbdl rag query` runs) and the
answers are scored by `lbdl eval task` on files of assembled prompts. Data, runs and logs go into WORKDIR.

1. Worlds of data/make_tasks.py's facts generator (countries, cities, languages, animals, people with an age, a
   colour, a city, a job; invented names). FRESH: `world(random.Random(--fresh-seed))`, new invented names: the
   knowledge base, and its `facts_splits` test split (one paraphrase per fact, 272) the held-out questions.
   TRAINING: the shipped world (data/tasks/facts-*.jsonl, seed 20250813) and --train-worlds - 1 generated ones
   (seeds 1, 2, ...; one sharing an invented word with the fresh world is passed over), all three paraphrases
   of each fact. One world is 272 facts, which a model can learn by heart; many make reading the passage the
   only way to lower the loss. No invented word of the fresh world occurs anywhere in the training data
   (asserted).
2. The knowledge base: the fresh world's documents written as files, one per entity (WORKDIR/kb/person-07.txt),
   one fact sentence a line; `lbdl rag index kb --chunk-tokens 24 --overlap 0` makes each line a chunk
   (asserted), so four sources fit the bundled model's context of 256 with the question (a whole document is
   60-95 tokens: one or two would fit). Three indexes: lexical only, dense with the raw bundled model, dense
   with the contrastive embedder (its hybrid mode fuses it with BM25). Sources are cited by their path relative
   to WORKDIR (`kb/person-07.txt:3-3`), as an index built there names them.
3. The embedder: `lbdl finetune models/default pairs.jsonl --objective contrastive --method full` on the
   training worlds' (question, fact sentence) pairs, in-batch negatives.
4. The reader: `lbdl finetune models/default reader.jsonl --method full` (loss on the completion) on records
   whose prompt is the RAG prompt `lbdl generate --rag` builds (`rag.assemble.build_rag_prompt`: the
   instruction, the sources `[n] path:lines` and their text, then `Q: ... A:`): the gold chunk among 1-4
   sources, the others hard distractors of its world (the entity's other facts, the same relation of other
   entities: what BM25 ranks next), in random order, so the reader learns to pick rather than to copy source
   [1]; a share --closed-share has no sources (closed book). Completion: " answer\n". The training worlds'
   chunks are made in the script as the index would make them (a sentence each): no index is built for them.
5. Retrieval recall@1 and @k on the held-out questions: the fact's document among the top hits (doc), and its
   very sentence (fact: what the reader needs), for bm25, dense (raw model), dense (contrastive embedder),
   hybrid (bm25 + contrastive, reciprocal-rank fusion) and hybrid (bm25 + raw).
6. Exact match of the reader's greedy answer (`lbdl eval task`, auto extraction: numbers for ages) on the
   held-out questions: closed book (`Q: ... A:`), with the top --k chunks of the retriever of best fact
   recall@k, and with the gold chunk alone (the upper bound); 95% Wilson intervals, the paired differences
   (McNemar), a breakdown per kind of fact. The untuned bundled model with retrieval is a reference row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread each, this script's and the CLI's; on a
# shared 2-core machine more threads spin against the other load (a 12-token embedding: 25 ms at 1, 500 ms at 2)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
from lbdl_run import ROOT, lbdl  # noqa: E402  (benchmarks/lbdl_run.py)
from machine import capabilities  # noqa: E402  (benchmarks/machine.py)
from make_tasks import FACT_KINDS, FIRST_NAMES, facts_splits, world  # noqa: E402  (data/make_tasks.py)

from lbdl_cli.evaluate import paired_difference, wilson_interval  # noqa: E402

MODEL = ROOT / "models" / "default"
TASKS = ROOT / "data" / "tasks"
CONTEXT, MAX_NEW = 256, 16
CHUNK = ["--chunk-tokens", 24, "--overlap", 0]
KINDS = list(FACT_KINDS)
OPEN_KINDS = ("capital", "language", "country", "city")  # answers are invented words; the others a small set


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text.strip())


# --- 1. worlds -------------------------------------------------------------------------------------------------


def shipped_world() -> tuple[list[dict], list[dict]]:
    """(documents, questions) of the shipped world: data/tasks/facts-docs.jsonl and both question splits."""
    def read(name):
        return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines() if line]

    return read("facts-docs.jsonl"), read("facts-train.jsonl") + read("facts-test.jsonl")


def generated_world(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(documents, train split, test split) of `world(random.Random(seed))`: the held-out paraphrase of each fact
    in the test split."""
    rng = random.Random(seed)
    docs, facts = world(rng)
    train, test = facts_splits(rng, facts)
    return docs, train, test


def invented(docs: list[dict]) -> set[str]:
    """The world's invented words: every capitalised word of its documents but the first names and sentence
    openers."""
    common = {f for f, _ in FIRST_NAMES} | {"The", "People"}
    return {w for d in docs for w in re.findall(r"[A-Z][a-z]+", d["text"])} - common


def training_worlds(n: int, fresh_docs: list[dict], fresh_seed: int) -> tuple[list[tuple[str, list, list]], list]:
    """The shipped world and n - 1 generated ones (seeds 1, 2, ...; never the fresh seed, and a world sharing an
    invented word with the fresh one is passed over): [(name, documents, questions)] and the seeds passed over."""
    fresh = invented(fresh_docs)
    docs, questions = shipped_world()
    assert not invented(docs) & fresh, "the fresh world shares a word with the shipped one; choose another seed"
    worlds, skipped, seed = [("w00", docs, questions)], [], 0
    while len(worlds) < n:
        seed += 1
        if seed == fresh_seed:
            continue
        docs, train, test = generated_world(seed)
        if invented(docs) & fresh:
            skipped.append(seed)
            continue
        worlds.append((f"w{seed:02d}", docs, train + test))
    return worlds, skipped


def check_disjoint(fresh_docs: list[dict], training_texts: list[str]) -> int:
    """No invented word of the fresh world in any training text; returns how many there are."""
    words = invented(fresh_docs)
    seen = {w for t in training_texts for w in re.findall(r"[A-Za-z]+", t)}
    clash = sorted(words & seen)
    assert not clash, f"fresh-world words in the training data: {clash[:10]}; choose another --fresh-seed"
    return len(words)


# --- 2. knowledge bases ---------------------------------------------------------------------------------------


def write_kb(dir: Path, docs: list[dict]) -> Path:
    """One file per document, one fact sentence a line."""
    if dir.exists():
        shutil.rmtree(dir)
    dir.mkdir(parents=True)
    for d in docs:
        (dir / f"{d['id']}.txt").write_text("\n".join(sentences(d["text"])) + "\n", encoding="utf-8")
    return dir


def index(work: Path, kb: Path, name: str, *extra) -> tuple[Path, dict, float]:
    out = work / f"{name}.rag"
    res, wall = lbdl(["rag", "index", kb, "--out", out, "--force", *CHUNK, *extra], work / "logs" / f"index-{name}.txt")
    from lbdl_cli.rag.index import Index

    chunks = Index(out).chunks
    assert all(c["first_line"] == c["last_line"] for c in chunks), f"{out}: a chunk of more than one line"
    return out, res, wall


def doc_of(hit: dict) -> str:
    return Path(hit["path"]).stem


def short(hits: list[dict], work: Path) -> list[dict]:
    """The hits with their paths relative to WORKDIR (`kb/person-07.txt`), as an index built there by `lbdl rag
    index kb` names them: the sources' headers are then as short as a user's would be."""
    return [{**h, "path": os.path.relpath(h["path"], work)} for h in hits]


# --- 3-4. training data ---------------------------------------------------------------------------------------


def world_chunks(name: str, docs: list[dict]) -> dict[str, list[dict]]:
    """A training world's chunks as its index would hold them (a file per document under kb-train/NAME/, a
    chunk per line), by document id."""
    return {d["id"]: [{"path": f"kb-train/{name}/{d['id']}.txt", "first_line": i, "last_line": i, "text": line}
                      for i, line in enumerate(sentences(d["text"]), 1)] for d in docs}


def reader_records(worlds, tok, variants: int, closed_share: float, seed: int) -> list[dict]:
    """`variants` records per training question: the RAG prompt over its gold chunk and 0-3 hard distractors (the
    other facts of the same entity, or the same relation of other entities of its world: what BM25 ranks next),
    in random order; a share closed_share has no sources (closed book). The answer is the completion."""
    from lbdl_cli.rag.assemble import build_rag_prompt

    rng = random.Random(seed)
    out = []
    for name, docs, questions in worlds:
        chunks = world_chunks(name, docs)
        by_kind: dict[str, list[dict]] = {}
        for q in questions:
            by_kind.setdefault(q["kind"], [])
        kind_of = {q["fact"]: q["kind"] for q in questions}
        for cs in chunks.values():
            for c in cs:
                by_kind[kind_of[c["text"]]].append(c)
        for q in questions:
            gold = next(c for c in chunks[q["doc"]] if c["text"] == q["fact"])
            same_doc = [c for c in chunks[q["doc"]] if c is not gold]
            same_kind = [c for c in by_kind[q["kind"]] if c["path"] != gold["path"]]
            for _ in range(variants):
                hits = []
                if rng.random() >= closed_share:
                    n = rng.randint(1, 4)
                    picked = rng.sample(same_doc, min(len(same_doc), rng.randint(0, n - 1)))
                    picked += rng.sample(same_kind, n - 1 - len(picked))
                    hits = [gold] + picked
                    rng.shuffle(hits)
                built = build_rag_prompt(question_of(q), hits, tok, CONTEXT, MAX_NEW)  # the last dropped to fit
                if built.sources and gold not in built.sources:
                    continue  # the gold chunk was dropped (rare: four long sentences)
                out.append({"prompt": built.text, "completion": q["completion"]})
    rng.shuffle(out)
    return out


# --- 5. retrieval --------------------------------------------------------------------------------------------


def recall(questions: list[dict], index_dir: Path, mode: str, k: int, weights=(1.0, 1.0)) -> tuple[dict, list]:
    """recall@1 and @k (doc and fact) of `mode` over the questions; the hits of each."""
    from lbdl_cli.rag.index import Index
    from lbdl_cli.rag.retrieve import index_embedder, search

    idx = Index(index_dir)
    embedder = index_embedder(idx) if mode != "bm25" else None
    t0 = time.perf_counter()
    all_hits, counts = [], Counter()
    for q in questions:
        hits = search(idx, question_of(q), k, mode, embedder, weights)
        all_hits.append(hits)
        docs, facts = [doc_of(h) for h in hits], [h["text"].strip() for h in hits]
        counts["doc@1"] += docs[:1] == [q["doc"]]
        counts[f"doc@{k}"] += q["doc"] in docs
        counts["fact@1"] += facts[:1] == [q["fact"]]
        counts[f"fact@{k}"] += q["fact"] in facts
    n = len(questions)
    row = {name: {"recall": c / n, "hits": c, "ci95": list(wilson_interval(c, n))} for name, c in counts.items()}
    return {"index": str(index_dir), "mode": mode, "k": k, "n": n, "seconds": time.perf_counter() - t0,
            **row}, all_hits


def question_of(q: dict) -> str:
    return q["prompt"][len("Q: "):-len(" A:")]


# --- 6. answers ----------------------------------------------------------------------------------------------


def prompt_files(work: Path, questions: list[dict], hits: list[list[dict]], gold_index: Path, tok, k: int) \
        -> tuple[dict[str, Path], int]:
    """Task files of assembled prompts: closed book, retrieved (top k), gold chunk alone."""
    from lbdl_cli.rag.assemble import build_rag_prompt
    from lbdl_cli.rag.index import Index

    gold = {c["text"].strip(): c for c in Index(gold_index).chunks}
    files, dropped = {}, 0  # sources dropped to fit the context (as `lbdl generate --rag` drops them)
    for name in ("closed", "retrieved", "gold"):
        records = []
        for q, h in zip(questions, hits):
            sources = {"closed": [], "retrieved": h[:k], "gold": [gold[q["fact"]]]}[name]
            built = build_rag_prompt(question_of(q), short(sources, work), tok, CONTEXT, MAX_NEW)
            dropped += built.sources_dropped
            records.append({"prompt": built.text, "answer": q["answer"], "kind": q["kind"]})
        files[name] = write_jsonl(work / f"answers-{name}.jsonl", records)
    return files, dropped


def score(work: Path, model: Path, path: Path, name: str, questions: list[dict]) -> dict:
    res, wall = lbdl(["eval", "task", model, path, "--max-new-tokens", MAX_NEW, "--batch-size", 16],
                     work / "logs" / f"eval-{name}.txt")
    rows = res["records"]
    per_kind = {}
    for kind in KINDS:
        hits = [r["correct"] for r, q in zip(rows, questions) if q["kind"] == kind]
        per_kind[kind] = {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits),
                          "ci95": list(wilson_interval(sum(hits), len(hits)))}
    for group, kinds in (("open", OPEN_KINDS), ("closed set", tuple(k for k in KINDS if k not in OPEN_KINDS))):
        hits = [r["correct"] for r, q in zip(rows, questions) if q["kind"] in kinds]
        per_kind[group] = {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits),
                           "ci95": list(wilson_interval(sum(hits), len(hits)))}
    return {"accuracy": res["accuracy"], "correct": res["correct"], "total": res["total"], "ci95": res["ci95"],
            "per_kind": per_kind, "correct_list": [r["correct"] for r in rows], "seconds": wall,
            "examples": [{"prompt": r["prompt"][-80:], "answer": r["answer"], "completion": r["completion"]}
                         for r in rows[:5]]}


# --- the run ---------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--fresh-seed", type=int, default=8101, help="random.Random seed of the fresh world")
    p.add_argument("--reader-steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="the reader's peak learning rate")
    p.add_argument("--train-worlds", type=int, default=20, help="training worlds: the shipped one and N - 1 generated")
    p.add_argument("--variants", type=int, default=1, help="reader records per training question")
    p.add_argument("--closed-share", type=float, default=0.1, help="share of reader records without sources")
    p.add_argument("--embed-steps", type=int, default=150)
    p.add_argument("--embed-batch-size", type=int, default=32)
    p.add_argument("--embed-lr", type=float, default=1e-4)
    p.add_argument("--k", type=int, default=4, help="sources retrieved per question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wall: dict[str, float] = {}

    from lbdl_cli.checkpoint import model_tokenizer

    tok = model_tokenizer(MODEL)

    # 1-2. worlds, knowledge bases, indexes
    t0 = time.perf_counter()
    fresh_docs, _, fresh_qs = generated_world(args.fresh_seed)
    worlds, skipped = training_worlds(args.train_worlds, fresh_docs, args.fresh_seed)
    train_qs = [q for _, _, qs in worlds for q in qs]
    fresh_words = check_disjoint(fresh_docs, [d["text"] for _, docs, _ in worlds for d in docs] +
                                 [q["prompt"] for q in train_qs])
    kb = write_kb(work / "kb", fresh_docs)
    bm25_index, _, _ = index(work, kb, "bm25")
    raw_index, _, _ = index(work, kb, "raw", "--model", MODEL)
    wall["data and indexes"] = time.perf_counter() - t0

    # 3. the embedder
    t0 = time.perf_counter()
    pairs = write_jsonl(work / "pairs.jsonl", [{"query": question_of(q), "passage": q["fact"]} for q in train_qs])
    emb_run = work / "runs" / "embedder"
    embedder, _ = lbdl(["finetune", MODEL, pairs, "--objective", "contrastive", "--method", "full", "--max-steps",
                        args.embed_steps, "--batch-size", args.embed_batch_size, "--lr", args.embed_lr,
                        "--val-fraction", 0.1, "--eval-interval", max(args.embed_steps // 3, 1), "--eval-batches", 4,
                        "--log-interval", 25, "--seed", args.seed, "--out", emb_run, "--force"],
                       work / "logs" / "finetune-embedder.txt")
    con_index, _, _ = index(work, kb, "contrastive", "--model", emb_run / "best")
    wall["embedder (contrastive fine-tune + index)"] = time.perf_counter() - t0

    # 4. the reader
    t0 = time.perf_counter()
    records = reader_records(worlds, tok, args.variants, args.closed_share, args.seed)
    reader_data = write_jsonl(work / "reader.jsonl", records)
    reader_run = work / "runs" / "reader"
    reader, _ = lbdl(["finetune", MODEL, reader_data, "--method", "full", "--max-steps", args.reader_steps,
                      "--batch-size", args.batch_size, "--lr", args.lr, "--context", CONTEXT, "--warmup", 0.05,
                      "--val-fraction", 0.05, "--eval-interval", max(args.reader_steps // 4, 1), "--eval-batches", 5,
                      "--log-interval", 25, "--seed", args.seed, "--out", reader_run, "--force"],
                     work / "logs" / "finetune-reader.txt")
    wall["reader (fine-tune)"] = time.perf_counter() - t0

    # 5. retrieval
    t0 = time.perf_counter()
    k = args.k
    retrievers = {"bm25": (bm25_index, "bm25"), "dense, raw model": (raw_index, "dense"),
                  "dense, contrastive": (con_index, "dense"), "hybrid, bm25 + contrastive": (con_index, "hybrid"),
                  "hybrid, bm25 + raw": (raw_index, "hybrid")}
    retrieval, hits = {}, {}
    for name, (idx, mode) in retrievers.items():
        retrieval[name], hits[name] = recall(fresh_qs, idx, mode, k)
    best = max(retrieval, key=lambda n: (retrieval[n][f"fact@{k}"]["hits"], retrieval[n]["fact@1"]["hits"]))
    wall["retrieval (5 retrievers x 272 questions)"] = time.perf_counter() - t0

    # 6. answers
    t0 = time.perf_counter()
    files, dropped = prompt_files(work, fresh_qs, hits[best], bm25_index, tok, k)
    answers = {name: score(work, reader_run / "best", path, name, fresh_qs) for name, path in files.items()}
    answers["untuned model, retrieved"] = score(work, MODEL, files["retrieved"], "untuned-retrieved", fresh_qs)
    paired = {f"{b} - {a}": paired_difference(answers[a]["correct_list"], answers[b]["correct_list"])
              for a, b in (("closed", "retrieved"), ("retrieved", "gold"))}
    wall["answers (4 x 272 prompts)"] = time.perf_counter() - t0
    total = time.perf_counter() - started

    labels = {"closed": "reader, no retrieval (closed book)", "retrieved": f"reader + {best}, top {k}",
              "gold": "reader + the gold chunk alone (upper bound)",
              "untuned model, retrieved": f"untuned bundled model + {best}, top {k}"}
    print()
    print(f"machine: {capabilities()}")
    print(f"worlds: training = the shipped one and {len(worlds) - 1} generated ({', '.join(w for w, _, _ in worlds)}"
          f"{'; seeds passed over for a shared word: ' + str(skipped) if skipped else ''}), "
          f"{len(worlds) * len(worlds[0][1])} documents, {len(train_qs)} questions; fresh = "
          f"seed {args.fresh_seed} ({len(fresh_docs)} documents, {fresh_words} invented words, none in training; "
          f"{len(fresh_qs)} held-out questions)")
    print(f"embedder: contrastive, full, {args.embed_steps} steps of {args.embed_batch_size} pairs, lr "
          f"{args.embed_lr}: best val loss {embedder.get('best_val_loss')}")
    print(f"reader: full fine-tune, {len(records)} records, {args.reader_steps} steps of {args.batch_size}, lr "
          f"{args.lr}: best val loss {reader.get('best_val_loss')}")
    print(f"prompts: {dropped} retrieved sources dropped to fit the context of {CONTEXT} with {MAX_NEW} new tokens")
    print()
    print(f"| retriever | doc recall@1 | doc recall@{k} | fact recall@1 | fact recall@{k} |")
    print("|---|---:|---:|---:|---:|")
    for name, r in retrieval.items():
        print(f"| {name} | " + " | ".join(f"{r[m]['recall']:.3f}" for m in ("doc@1", f"doc@{k}", "fact@1",
                                                                              f"fact@{k}")) + " |")
    print()
    print("| answers (exact match) | all | 95% CI | open (invented words) | closed set (colour, job, animal, age) |")
    print("|---|---:|---|---:|---:|")
    for name, a in answers.items():
        print(f"| {labels[name]} | {a['accuracy']:.3f} | [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] | "
              f"{a['per_kind']['open']['accuracy']:.3f} | {a['per_kind']['closed set']['accuracy']:.3f} |")
    print()
    print("| per kind | " + " | ".join(KINDS) + " |")
    print("|---|" + "---:|" * len(KINDS))
    for name, a in answers.items():
        print(f"| {labels[name]} | " + " | ".join(f"{a['per_kind'][kd]['accuracy']:.2f}" for kd in KINDS) + " |")
    print()
    for name, d in paired.items():
        print(f"{name}: {d['difference']:+.3f}, 95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], McNemar p = "
              f"{d['mcnemar_p']:.2g}")
    print("wall: " + "; ".join(f"{n} {s:.0f} s" for n, s in wall.items()) + f"; total {total:.0f} s")
    summary = {"retrieval": {n: {m: r[m]["recall"] for m in ("doc@1", f"doc@{k}", "fact@1", f"fact@{k}")}
                             for n, r in retrieval.items()},
               "answers": {n: a["accuracy"] for n, a in answers.items()}, "best_retriever": best, "seconds": total}
    if args.json:
        for a in answers.values():
            a.pop("correct_list")
        args.json.write_text(json.dumps({"machine": capabilities(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "embedder": embedder, "reader": reader, "retrieval": retrieval,
                                         "answers": answers, "paired": paired, "sources_dropped": dropped, "wall": wall,
                                         "seconds": total,
                                         "summary": summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
