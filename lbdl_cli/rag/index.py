"""The RAG index: a directory of chunks, their BM25 index and (with a model) their embeddings.

    from lbdl_cli.rag.index import IndexConfig, build_index, load_index
    build_index(["docs/", "README.md"], "docs.rag", IndexConfig(model="run/best"))   # again: only what changed
    index = load_index("docs.rag"); index.chunks[0]["text"], index.embeddings().shape

The directory (written atomically: a crash leaves the previous index or none):
    index.json              format_version, lbdl version, chunking, tokenizer_sha256, bm25 {k1, b, method, tokens},
                            embedder (the embedding model's identity, or null), files {path: {sha256, size,
                            chunks: [ids]}}, skipped {path: reason}
    chunks.jsonl            one chunk a line: id, path, first_line, last_line, file_sha256, tokens, text
    embeddings.safetensors  "embeddings": float32 (N, C), unit rows, in chunk order (only with a model)
    bm25/                   bm25s's files: data/indices/indptr .npy (no pickle) + vocab and params JSON

Built again into the same directory, an index adds the new files, re-chunks the changed ones (by sha256), keeps
the files it holds that this run does not name (unless `prune`), and embeds only the chunks whose text it has
no embedding for; BM25 is rebuilt over all chunks. Other settings (chunking, tokenizer, terms, embedding
model) are refused: rebuild with force.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..atomic import atomic_dir
from ..config import adapter_setting, device_setting, dtype_setting, setting
from ..errors import ConfigError, DataError, OutputExistsError
from ..files import read_json
from ..progress import Progress, report
from .chunk import ChunkConfig, Skipped, chunk_text, collect_files, read_document
from .embed import POOLINGS, same_model
from .lexical import K1, METHOD, TOKENS, B, Lexical

FORMAT_VERSION = 1
INDEX_FILE, CHUNKS_FILE, EMBEDDINGS_FILE, BM25_DIR = "index.json", "chunks.jsonl", "embeddings.safetensors", "bm25"
EMBEDDINGS_KEY = "embeddings"


@dataclass(frozen=True)
class IndexConfig(ChunkConfig):
    """`lbdl rag index`: chunking, the BM25 terms, and the embedding model of a dense index."""

    model: str | None = setting(None, "Embed the chunks with this model directory (default: the bundled model) for "
                                      "dense and hybrid retrieval; without it the index is lexical (BM25) only.",
                                metavar="MODEL")
    adapter: str | None = adapter_setting()
    pooling: str = setting("eos", "The embedding: the hidden state at an appended <eos> (eos) or the mean over "
                                  "the text (mean).", choices=POOLINGS)
    bm25_tokens: str = setting("words", "BM25 terms: the lower-cased words (words) or the tokenizer's pieces.",
                               choices=TOKENS)
    batch_size: int = setting(16, "Chunks per embedding batch.", low=1, high=1 << 14)
    prune: bool = setting(False, "Drop the files the index holds that this run does not name (default: keep "
                                 "them).")
    compute_dtype: str = dtype_setting()
    device: str = device_setting()

    def chunking(self, limit: int | None = None) -> ChunkConfig:
        """The chunk settings, the chunks cut at `limit` tokens (what the embedding model embeds whole) when
        chunk_tokens is more."""
        if limit is None or self.chunk_tokens <= limit:
            return ChunkConfig(chunk_tokens=self.chunk_tokens, overlap=self.overlap)
        return ChunkConfig(chunk_tokens=limit, overlap=min(self.overlap, limit // 2))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- reading an index --------------------------------------------------------------------------------------------


def read_meta(dir: str | os.PathLike) -> dict:
    """index.json of an index directory, its format version checked."""
    dir = Path(dir)
    if not dir.is_dir():
        raise DataError(f"index {dir} does not exist; build it with `lbdl rag index DOCS --out {dir}`"
                        if not dir.exists() else f"index {dir} is a file, not an index directory")
    if not (dir / INDEX_FILE).is_file():
        raise DataError(f"{dir} is not a RAG index (no {INDEX_FILE}); build one with `lbdl rag index DOCS --out "
                        f"DIR`")
    meta = read_json(dir / INDEX_FILE, "index file")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise DataError(f"{dir / INDEX_FILE} has no format_version; rebuild the index with --force")
    if version > FORMAT_VERSION:
        raise DataError(f"index {dir} has format version {version}, newer than this lbdl reads ({FORMAT_VERSION}); "
                        f"upgrade lbdl or rebuild the index")
    return meta


class Index:
    """A loaded index: its metadata, its chunks (dicts, in order), its BM25 and embeddings read on first use."""

    def __init__(self, dir: str | os.PathLike):
        self.dir = Path(dir)
        self.meta = read_meta(self.dir)
        self.chunks = read_chunks(self.dir)
        self._lexical = self._embeddings = None

    @property
    def embedder(self) -> dict | None:
        return self.meta.get("embedder")

    @property
    def has_embeddings(self) -> bool:
        return self.embedder is not None

    def lexical(self) -> Lexical:
        if self._lexical is None:
            self._lexical = Lexical.load(self.dir / BM25_DIR, self.meta["bm25"]["tokens"])
        return self._lexical

    def embeddings(self):
        """(N, C) float32 tensor of the chunks' embeddings; a DataError for a lexical-only index."""
        if self._embeddings is None:
            if not self.has_embeddings:
                raise DataError(f"index {self.dir} has no embeddings (built without --model); use --mode bm25, or "
                                f"rebuild it with --model MODEL --force")
            from safetensors.torch import load_file

            try:
                self._embeddings = load_file(self.dir / EMBEDDINGS_FILE)[EMBEDDINGS_KEY]
            except (OSError, KeyError, RuntimeError) as e:
                raise DataError(f"{self.dir / EMBEDDINGS_FILE} cannot be read ({e}); rebuild the index with "
                                f"--force") from None
            if self._embeddings.shape[0] != len(self.chunks):
                raise DataError(f"{self.dir / EMBEDDINGS_FILE} holds {self._embeddings.shape[0]} rows for "
                                f"{len(self.chunks)} chunks; rebuild the index with --force")
        return self._embeddings


def read_chunks(dir: Path) -> list[dict]:
    from ..files import read_jsonl

    return [rec for _, rec in read_jsonl(dir / CHUNKS_FILE, "chunks file")] if (dir / CHUNKS_FILE).exists() else []


def load_index(dir: str | os.PathLike) -> Index:
    return Index(dir)


# --- building ---------------------------------------------------------------------------------------------------


def embedder_identity(cfg: IndexConfig) -> dict | None:
    """The identity of cfg's embedding model, computed from the files without loading it (None: lexical only)."""
    if cfg.model is None:
        return None
    from ..checkpoint import default_model_dir, read_config
    from ..lora import ADAPTER_WEIGHTS, base_sha256, file_sha256

    dir = default_model_dir() if cfg.model == "default" else Path(cfg.model)
    config = read_config(dir)
    adapter = Path(cfg.adapter) if cfg.adapter is not None else None
    if adapter is not None and not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"adapter {adapter} has no {ADAPTER_WEIGHTS}; give a LoRA adapter directory")
    return {"model": str(dir), "sha256": base_sha256(dir), "adapter": str(adapter) if adapter else None,
            "adapter_sha256": file_sha256(adapter / ADAPTER_WEIGHTS) if adapter else None, "pooling": cfg.pooling,
            "dim": config["model"]["n_embd"]}


def embed_limit(identity: dict | None) -> int | None:
    """The most tokens of a text the embedding model embeds whole (its context less the appended <eos>)."""
    if identity is None:
        return None
    from ..checkpoint import read_config

    return read_config(Path(identity["model"]))["model"]["block_size"] - 1


def _tokenizer(identity: dict | None):
    """The index's tokenizer: its embedding model's, or the bundled model's for a lexical index."""
    from ..checkpoint import default_model_dir, model_tokenizer

    return model_tokenizer(Path(identity["model"]) if identity else default_model_dir())


def _settings(chunking: ChunkConfig, cfg: IndexConfig, tok, identity: dict | None) -> dict:
    return {"chunking": chunking.to_dict(), "tokenizer_sha256": tok.sha256,
            "bm25": {"k1": K1, "b": B, "method": METHOD, "tokens": cfg.bm25_tokens}, "embedder": identity}


def _check_same(out: Path, old: dict, new: dict) -> None:
    """An index is updated only with the settings it was built with."""
    def differ(what: str, was, now):
        raise ConfigError(f"index {out} was built with {what} {was}, this run gives {now}; give the same settings "
                          f"to update it, or --force to rebuild it")

    a, b = old.get("embedder"), new["embedder"]
    if (a is None) != (b is None) or (a is not None and not same_model(a, b)):
        def name(e):
            return "no model (lexical only)" if e is None else (
                f"model {e['model']} (sha256 {e['sha256'][:12]}" + (
                    f", adapter {e['adapter_sha256'][:12]}" if e.get("adapter_sha256") else "") +
                f", {e['pooling']} pooling)")
        differ("the embedding", name(a), name(b))
    if old.get("chunking") != new["chunking"]:
        c, n = old.get("chunking") or {}, new["chunking"]
        differ("chunk_tokens/overlap", f"{c.get('chunk_tokens')}/{c.get('overlap')}",
               f"{n['chunk_tokens']}/{n['overlap']}")
    if old.get("bm25", {}).get("tokens") != new["bm25"]["tokens"]:
        differ("BM25 terms", old.get("bm25", {}).get("tokens"), new["bm25"]["tokens"])
    if old.get("tokenizer_sha256") != new["tokenizer_sha256"]:
        differ("tokenizer sha256", str(old.get("tokenizer_sha256"))[:12], new["tokenizer_sha256"][:12])


def _existing(out: Path, force: bool) -> Index | None:
    """The index already at `out` (None: none, or --force); an error for something else there."""
    if force or not os.path.lexists(out):
        return None
    if not out.is_dir() or not (out / INDEX_FILE).is_file():
        raise OutputExistsError(f"output {out} exists and is not a RAG index; choose another path or pass --force")
    return Index(out)


def build_index(docs: list[str], out: str | os.PathLike, cfg: IndexConfig | None = None, force: bool = False,
                progress: Progress | None = None) -> dict:
    """Index the files of `docs` (files, directories walked) into the directory `out`, or update the index there.
    Returns what was done: files indexed, added, changed, unchanged, kept, removed, skipped (with reasons),
    chunks, embedded (how many chunks were embedded now), seconds."""
    start = time.perf_counter()
    cfg, out = cfg or IndexConfig(), Path(out)
    old = _existing(out, force)
    documents = collect_files(docs, exclude=out)
    identity = embedder_identity(cfg)
    tok = _tokenizer(identity)
    chunking = cfg.chunking(embed_limit(identity))
    if chunking.chunk_tokens < cfg.chunk_tokens:
        report(progress, "chunk", message=f"chunks cut at {chunking.chunk_tokens} tokens (overlap "
                                          f"{chunking.overlap}): {identity['model']} embeds {chunking.chunk_tokens} "
                                          f"tokens and the <eos> whole", level="warning")
    settings = _settings(chunking, cfg, tok, identity)
    if old is not None:
        _check_same(out, old.meta, settings)
    old_files = old.meta.get("files", {}) if old is not None else {}
    old_chunks: dict[str, list[dict]] = {}
    for c in old.chunks if old is not None else []:
        old_chunks.setdefault(c["path"], []).append(c)

    files, chunks, skipped = {}, [], {}
    added, changed, unchanged = [], [], 0
    for i, doc in enumerate(documents):
        report(progress, "chunk", i, len(documents), unit="files", status=doc.name)
        try:
            text, sha = read_document(doc.path)
        except Skipped as why:
            skipped[doc.name] = str(why)
            continue
        if doc.name in files:
            continue
        previous = old_files.get(doc.name)
        if previous is not None and previous["sha256"] == sha:
            mine = old_chunks.get(doc.name, [])
            unchanged += 1
        else:
            mine = [c.to_dict() for c in chunk_text(text, doc.name, sha, tok, chunking)]
            (changed if previous is not None else added).append(doc.name)
        files[doc.name] = {"sha256": sha, "size": doc.path.stat().st_size, "chunks": [c["id"] for c in mine]}
        chunks += mine
    report(progress, "chunk", len(documents), len(documents), unit="files")
    removed, kept = [], 0
    for name, entry in old_files.items():
        if name in files or name in skipped:
            continue
        if cfg.prune:
            removed.append(name)
        else:
            files[name] = entry
            chunks += old_chunks.get(name, [])
            kept += 1
    if not files:
        first = next(iter(skipped.items()), None)
        why = f": {len(skipped)} skipped (e.g. {first[0]}: {first[1]})" if first else ""
        raise DataError(f"nothing to index{why}; give UTF-8 text files")
    if not chunks:
        raise DataError("the documents hold no text to index; give UTF-8 text files")

    embeddings, embedded = None, 0
    if identity is not None:
        embeddings, embedded = _embed(chunks, old, cfg, identity, progress)
    lexical = Lexical.build([c["text"] for c in chunks], cfg.bm25_tokens, tok)
    meta = {"format_version": FORMAT_VERSION, "lbdl_version": __version__, **settings,
            "chunks": len(chunks), "files": files, "skipped": skipped}
    with atomic_dir(out, force=True) as tmp:
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(tmp / CHUNKS_FILE, "w", encoding="utf-8") as f:
            for c in chunks:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        if embeddings is not None:
            from safetensors.torch import save_file

            save_file({EMBEDDINGS_KEY: embeddings.contiguous()}, tmp / EMBEDDINGS_FILE, metadata={"format": "pt"})
        lexical.save(tmp / BM25_DIR)
    return {"out": str(out), "files": len(files), "added": added, "changed": changed, "unchanged": unchanged,
            "kept": kept, "removed": removed, "skipped": skipped, "chunks": len(chunks), "embedded": embedded,
            "dense": identity is not None, "embedder": identity, "seconds": time.perf_counter() - start}


def _embed(chunks: list[dict], old: Index | None, cfg: IndexConfig, identity: dict, progress: Progress | None):
    """(N, C) embeddings of the chunks: the old index's rows for texts it embedded, the model for the rest (each
    distinct text once); how many texts were embedded now."""
    import torch

    known: dict[str, torch.Tensor] = {}
    if old is not None and old.has_embeddings:
        rows = old.embeddings()
        known = {text_sha256(c["text"]): rows[i] for i, c in enumerate(old.chunks)}
    keys = [text_sha256(c["text"]) for c in chunks]
    todo = {}
    for key, c in zip(keys, chunks):
        if key not in known and key not in todo:
            todo[key] = c["text"]
    if todo:
        from .embed import load_embedder

        embedder = load_embedder(None if cfg.model == "default" else cfg.model, cfg.adapter, cfg.pooling,
                                 cfg.compute_dtype, cfg.device, progress)
        if not same_model(embedder.identity, identity):  # the files changed while we read them
            raise DataError(f"model {cfg.model} changed while it was read; run again")
        vectors = embedder.embed(list(todo.values()), cfg.batch_size, progress)
        known.update(zip(todo, vectors))
    if not keys:
        return torch.zeros(0, identity["dim"]), 0
    return torch.stack([known[k] for k in keys]).float(), len(todo)
