"""Corpus -> token shards, and reading them back for training.

`prepare` cuts text files into documents (paragraphs between blank lines by
default), sends each whole document to `train.bin` or `val.bin` by a seeded
draw, and writes its token ids followed by <eos>. The shards are flat arrays
(uint16 when the vocabulary fits, else uint32) that `load_shards` memory-maps;
`meta.json` records the counts, the dtype, the sources with their hashes and
the sha256 of the tokenizer, whose file is copied beside the shards.

numpy and the tokenizer (sentencepiece) are imported inside the functions, so the CLI
can import this module for its defaults at no cost.
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizer.config import INVALID_UTF8_CHOICES, TOKENIZER_FILE

from .atomic import atomic_dir, check_out
from .config import MAX_SEED, Config, setting
from .errors import DataError
from .files import read_json
from .progress import Progress, report

FORMAT_VERSION = 1
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
VAL_TEXT_FILE = "val.txt"
SPLIT_CHOICES = ("paragraph", "line", "file")
BATCH_CHARS = 2_000_000  # text encoded per sentencepiece call


@dataclass(frozen=True)
class PrepareConfig(Config):
    """How to cut and split a corpus. `lbdl data prepare` takes its flags and defaults from here."""

    val_fraction: float = setting(0.1, "Share of documents drawn (seeded) for val.bin.", low=0, high=0.5)
    seed: int = setting(1337, "Seed of the train/val draw.", low=0, high=MAX_SEED)
    split_on: str = setting("paragraph", "What one document is: paragraph (ends at blank lines) | line | file.",
                            choices=SPLIT_CHOICES)
    invalid_utf8: str = setting("error", "What to do with invalid UTF-8: error | replace (U+FFFD) | skip (drop the "
                                         "line).", choices=INVALID_UTF8_CHOICES)
    num_threads: int = setting(0, "sentencepiece threads; 0 = every core.", low=0, high=1024)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# --- documents ---------------------------------------------------------------------------


def iter_documents(lines: Iterable[str], split_on: str = "paragraph") -> Iterator[str]:
    """Cut a file's lines (each with its line ending) into documents, losing no character.

    paragraph: a document ends with the blank lines after it, so a new one starts
    at the first non-blank line after a blank one; line: every non-blank line
    starts a document; file: the whole file is one. Blank lines at the start of
    the file belong to the first document. Joining the documents gives the file.
    """
    buf: list[str] = []
    has_text = False  # the buffer holds a non-blank line
    gap = False  # ... followed by at least one blank line
    for line in lines:
        if line.strip():
            if has_text and ((split_on == "paragraph" and gap) or split_on == "line"):
                yield "".join(buf)
                buf, gap = [], False
            buf.append(line)
            has_text = True
        else:
            buf.append(line)
            gap = has_text
    if buf:
        yield "".join(buf)


def _prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run `iterator` in a thread, `depth` items ahead (reading overlaps encoding)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            q.put((done, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


# --- prepare -----------------------------------------------------------------------------


def prepare(files, tokenizer, out, *, config: PrepareConfig | None = None, force: bool = False,
            progress: Progress | None = None, **options) -> dict:
    """Tokenize text files into `out/{train,val}.bin` + `meta.json` (+ tokenizer.model, and val.txt: the held-out
    text).

    `tokenizer` is a tokenizer directory or tokenizer.model file; the settings are `config`, or a
    PrepareConfig of `options`. Progress: bytes read ("tokenizing"). Returns the meta plus `out` and `seconds`.
    """
    import numpy as np

    from tokenizer import Tokenizer
    from tokenizer.corpus import TextFile, expand_files, total_bytes

    if config is None:
        config = PrepareConfig(**options)
    elif options:
        raise TypeError("prepare() takes a PrepareConfig or its fields, not both")
    paths = expand_files(files)
    tok = Tokenizer.load(tokenizer, num_threads=config.num_threads)
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.path} has no <eos> token to separate documents; use an lbdl tokenizer")
    out = Path(out)
    check_out(out, force, inputs=(*paths, tok.path))
    dtype = token_dtype(tok.vocab_size)
    start = time.perf_counter()
    rng = random.Random(f"split-{config.seed}")
    total = total_bytes(paths)
    sources: list[dict] = []
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0, "chars": 0} for split in ("train", "val")}
    has_text = False
    invalid_lines = 0

    def batches():
        """(source index, documents) batches of about BATCH_CHARS characters, read in a thread."""
        nonlocal invalid_lines
        for index, path in enumerate(paths):
            f = TextFile(path, config.invalid_utf8)
            batch, size = [], 0
            n_docs = 0
            for doc in iter_documents(f, config.split_on):
                batch.append(doc)
                size += len(doc)
                n_docs += 1
                if size >= BATCH_CHARS:
                    yield index, batch, before_bytes(index) + f.bytes_read
                    batch, size = [], 0
            yield index, batch, before_bytes(index) + f.bytes_read
            sources.append({"path": str(path), "sha256": f.hexdigest, "bytes": f.bytes_read, "documents": n_docs})
            invalid_lines += f.lines_skipped

    def before_bytes(index):
        return sum(s["bytes"] for s in sources[:index])

    with atomic_dir(out, force=force, inputs=(*paths, tok.path)) as tmp:
        with open(tmp / TRAIN_FILE, "wb") as train_fh, open(tmp / VAL_FILE, "wb") as val_fh, \
                open(tmp / VAL_TEXT_FILE, "w", encoding="utf-8", newline="") as val_text:
            handles = {"train": train_fh, "val": val_fh}
            for _, docs, done in _prefetch(batches()):
                splits = {"train": [], "val": []}
                for doc in docs:
                    split = "val" if config.val_fraction and rng.random() < config.val_fraction else "train"
                    splits[split].append(doc)
                    has_text = has_text or bool(doc.strip())
                for split, split_docs in splits.items():
                    if not split_docs:
                        continue
                    ids = tok.encode_concat(split_docs, eos=True, dtype=np.int64)
                    ids.astype(dtype).tofile(handles[split])
                    if split == "val":  # the held-out text itself, for `lbdl eval perplexity`
                        val_text.write("".join(split_docs))
                    c = counts[split]
                    c["tokens"] += int(ids.size)
                    c["documents"] += len(split_docs)
                    c["chars"] += sum(len(d) for d in split_docs)
                    c["bytes"] += sum(len(d.encode("utf-8")) for d in split_docs)
                report(progress, "tokenizing", done, total, unit="bytes")
        if not has_text:
            where = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            raise DataError(f"the corpus is empty (no text in {where}); pass files with text")
        n_docs = counts["train"]["documents"] + counts["val"]["documents"]
        if counts["train"]["documents"] == 0:
            raise DataError(f"no document went to train.bin ({n_docs} documents in all); "
                            f"add text or lower --val-fraction")
        if config.val_fraction and counts["val"]["documents"] == 0:
            raise DataError(f"no document went to val.bin ({n_docs} documents in all, --val-fraction "
                            f"{config.val_fraction}); add text, use --split-on line, or pass --val-fraction 0")
        (tmp / TOKENIZER_FILE).write_bytes(tok.model_bytes)
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "tokenizer_sha256": tok.sha256,
            "tokenizer_file": TOKENIZER_FILE,
            "train_tokens": counts["train"]["tokens"],
            "val_tokens": counts["val"]["tokens"],
            "train_documents": counts["train"]["documents"],
            "val_documents": counts["val"]["documents"],
            "train_bytes": counts["train"]["bytes"],
            "val_bytes": counts["val"]["bytes"],
            "train_chars": counts["train"]["chars"],
            "val_chars": counts["val"]["chars"],
            "sources": sources,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "split_on": config.split_on,
            "bos": False,
            "eos_after_document": True,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "invalid_utf8": config.invalid_utf8,
            "invalid_utf8_lines": invalid_lines,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - start
    return {**meta, "out": str(out), "tokenizer": str(tok.path), "seconds": round(seconds, 3)}


# --- reading shards back -----------------------------------------------------------------


def info(dir: str | os.PathLike) -> dict:
    """`lbdl data info`: a shard directory's meta.json, its shards checked against it (see load_shards)."""
    _, _, meta = load_shards(dir)
    return {"path": str(dir), **meta}


def read_meta(dir: str | os.PathLike) -> dict:
    """meta.json of a shard directory, its format checked."""
    dir = Path(dir)
    if not dir.is_dir():
        what = "does not exist" if not dir.exists() else "is not a directory"
        raise DataError(f"shard directory {dir} {what}; make one with `lbdl data prepare`")
    path = dir / META_FILE
    if not path.is_file():
        raise DataError(f"{dir} has no {META_FILE}; it is not a shard directory (make one with `lbdl data prepare`)")
    try:
        meta = read_json(path, "shard metadata")
    except DataError as e:
        raise DataError(f"{e} (`lbdl data prepare` writes it)") from None
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {version!r}; this lbdl reads format_version {FORMAT_VERSION} "
                        f"(re-run `lbdl data prepare`)")
    for key in ("dtype", "vocab_size", "tokenizer_sha256", "train_tokens", "val_tokens"):
        if key not in meta:
            raise DataError(f"{path} lacks {key!r}; re-run `lbdl data prepare`")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path} names dtype {meta['dtype']!r}; expected uint16 or uint32")
    for key, low in (("vocab_size", 1), ("train_tokens", 0), ("val_tokens", 0)):
        if type(meta[key]) is not int or meta[key] < low:  # bool is not a count
            raise DataError(f"{path}: {key} must be an integer >= {low}, got {meta[key]!r}; "
                            f"re-run `lbdl data prepare`")
    if not isinstance(meta["tokenizer_sha256"], str):
        raise DataError(f"{path}: tokenizer_sha256 must be a string, got {meta['tokenizer_sha256']!r}; "
                        f"re-run `lbdl data prepare`")
    return meta


def check_tokenizer(meta: dict, tokenizer: str | os.PathLike, data_dir: str | os.PathLike = "the shards") -> None:
    """Refuse shards made with another tokenizer than `tokenizer` (a directory or tokenizer.model)."""
    from tokenizer import file_hash, model_path

    path = model_path(tokenizer)
    digest = file_hash(path)
    if digest != meta["tokenizer_sha256"]:
        raise DataError(
            f"{data_dir} was tokenized with a different tokenizer (sha256 {meta['tokenizer_sha256'][:12]}) than "
            f"{path} (sha256 {digest[:12]}); re-run `lbdl data prepare --tokenizer {path.parent}` "
            f"or use the tokenizer the shards were made with")


def load_shards(dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """(train, val, meta): the token arrays memory-mapped read-only, and meta.json.

    With `tokenizer` (a model or tokenizer directory, or a tokenizer.model file),
    refuse shards whose tokenizer hash differs.
    """
    import numpy as np

    dir = Path(dir)
    meta = read_meta(dir)
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, dir)
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for name, key in ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens")):
        path = dir / name
        if not path.is_file():
            raise DataError(f"{dir} has no {name}; re-run `lbdl data prepare`")
        expected = int(meta[key]) * dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise DataError(f"{path} holds {size} bytes but meta.json says {meta[key]} {meta['dtype']} tokens "
                            f"({expected} bytes); the shard is truncated or stale: re-run `lbdl data prepare`")
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype))
    return arrays[0], arrays[1], meta


# --- batches ------------------------------------------------------------------------------
# Batches from token shards, as a pure function of (seed, sample index).
#
# The training shard is cut into non-overlapping windows of `context + 1`
# tokens (inputs and their next-token targets). Epoch e visits every window
# once, in the order of a permutation seeded by (seed, e). Sample i of the
# whole run is window perm_e[i mod n] with e = i // n, so the data position
# of a run is just its step: resuming, and splitting a global batch across
# ranks, need no loader state.


class WindowSampler:
    def __init__(self, tokens, context: int, seed: int, name: str = "train"):
        self.tokens, self.context, self.seed = tokens, context, seed
        self.n_windows = (len(tokens) - 1) // context
        if self.n_windows < 1:
            raise DataError(
                f"the {name} shard has {len(tokens)} tokens, fewer than one window of context {context} + 1; "
                f"use a shorter --context or more data"
            )
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        import torch

        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g), epoch
        return self._perm

    def windows(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch, j = divmod(i, self.n_windows)
            out.append(int(self._permutation(epoch)[j]))
        return out

    def batch(self, start: int, count: int, device="cpu"):
        """Samples [start, start + count) of the run: inputs and targets, each (count, context) int64."""
        import numpy as np
        import torch

        T = self.context
        rows = np.stack([np.asarray(self.tokens[w * T: w * T + T + 1], dtype=np.int64)
                         for w in self.windows(start, count)])
        xy = torch.from_numpy(rows)
        if device != "cpu":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def eval_batches(tokens, context: int, batch_size: int, n_batches: int, seed: int):
    """A fixed set of validation batches (the same at every evaluation)."""
    sampler = WindowSampler(tokens, context, seed + 1, name="validation")
    count = min(n_batches * batch_size, sampler.n_windows)
    return [sampler.batch(i, min(batch_size, count - i)) for i in range(0, count, batch_size)]


def unigram_loss(train, val, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training unigram distribution
    (add-one smoothed): the baseline a language model must beat."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.float64)
    for i in range(0, len(train), chunk):
        counts += np.bincount(np.asarray(train[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + 1) - np.log(counts.sum() + vocab_size)
    total = 0.0
    for i in range(0, len(val), chunk):
        total -= logp[np.asarray(val[i:i + chunk], dtype=np.int64)].sum()
    return float(total / max(1, len(val)))
