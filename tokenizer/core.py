"""`Tokenizer`: a sentencepiece BPE model with exact round trips and special tokens.

The file on disk is a plain sentencepiece `tokenizer.model`. This wrapper adds
what sentencepiece alone does not give:

- exact round trips: a literal U+2581 (sentencepiece's own space mark) is
  spelled with its three byte pieces, so it cannot turn into a space;
- user special tokens (control symbols) that ordinary text never produces,
  recognised in text only with `allow_special=True`, and decoded as their text;
- fast encoding of long text: it is cut after line breaks (atomic symbols, so
  the ids do not change) and the pieces are encoded on every core.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from lbdl_cli.atomic import atomic_dir
from lbdl_cli.errors import DataError
from lbdl_cli.files import read_json

from .config import BOS, CONFIG_FILE, EOS, LINE_BREAKS, PAD, TOKENIZER_FILE, UNK

FORMAT_VERSION = 1
SPACE_MARK = "\u2581"  # sentencepiece writes spaces as this character
CHUNK_CHARS = 4096  # long text is encoded in pieces of about this many characters


def model_path(path: str | os.PathLike) -> Path:
    """The tokenizer.model file named by `path`: the file itself or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"{path.parent} has no {TOKENIZER_FILE}; train one with `lbdl tokenizer train`")
        return path
    if not path.exists():
        raise DataError(f"tokenizer not found: {path} (name a tokenizer directory or its {TOKENIZER_FILE})")
    return path


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of the tokenizer.model bytes: a tokenizer's identity (file or directory)."""
    return hashlib.sha256(model_path(path).read_bytes()).hexdigest()


def display_piece(piece: str) -> str:
    """A piece made printable: line breaks, tabs and other control characters escaped."""
    out = []
    for c in piece:
        if c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c == "\\":
            out.append("\\\\")
        elif not c.isprintable() and c != SPACE_MARK:
            out.append(c.encode("unicode_escape").decode("ascii"))
        else:
            out.append(c)
    return "".join(out)


class Tokenizer:
    """A loaded tokenizer. Build one with `Tokenizer.load(path)` or `tokenizer.train(...)`."""

    def __init__(self, model_bytes: bytes, path: Path | None = None, config: dict | None = None,
                 num_threads: int = 0):
        if not model_bytes:
            raise DataError(f"{path or 'tokenizer'} is empty, not a sentencepiece model; "
                            f"train one with `lbdl tokenizer train`")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except (RuntimeError, OSError, UnicodeDecodeError) as e:
            # a UnicodeDecodeError: sentencepiece's own message quotes a piece that is not UTF-8
            text = e.object.decode("utf-8", "backslashreplace") if isinstance(e, UnicodeDecodeError) else str(e)
            detail = text.strip().splitlines()[0].removeprefix("INTERNAL: ") if text.strip() else ""
            if not detail or "ParseFromArray" in detail:  # protobuf's own words say nothing to a user
                detail = "it does not parse: cut short, damaged, or another kind of file"
            raise DataError(f"{path or 'tokenizer'} is not a sentencepiece model ({detail}); "
                            f"train one with `lbdl tokenizer train`") from None
        self.model_bytes = model_bytes
        self.path = path
        self.config = config or {}
        self.num_threads = num_threads or os.cpu_count() or 1
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        sp = self._sp
        n = sp.piece_size()
        if n <= 0:
            raise DataError(f"{path or 'tokenizer'} holds no pieces, not a usable sentencepiece model")
        self._n = n
        self._pieces = []
        for i in range(n):
            try:
                self._pieces.append(sp.id_to_piece(i))
            except UnicodeDecodeError as e:  # a damaged file can still parse, with pieces that are not text
                raise DataError(f"{path or 'tokenizer'} is not a usable sentencepiece model: piece {i} is not "
                                f"UTF-8 text (byte 0x{e.object[e.start]:02x}); the file is damaged, train or "
                                f"copy it again") from None
        self._control = {i for i in range(n) if sp.is_control(i)}
        self._base_special = {i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0}
        # user special tokens: every control symbol beyond <bos>/<eos>/<pad>
        self._user_special_ids = self._control - self._base_special
        self.user_special_tokens = [self._pieces[i] for i in sorted(self._user_special_ids)]
        self._byte_ids = {}
        for i in range(n):
            if sp.is_byte(i):
                self._byte_ids[int(self._pieces[i][3:5], 16)] = i
        self.byte_fallback = len(self._byte_ids) == 256
        # lbdl's settings (identity normalisation, spaces kept, no dummy prefix, byte fallback)
        # give exact round trips; a foreign model without them is used as sentencepiece has it
        self.exact = self.byte_fallback and sp.normalize(" a  \t b ") == "\u2581a\u2581\u2581\t\u2581b\u2581"
        self._space_ids = [self._byte_ids[b] for b in SPACE_MARK.encode("utf-8")] if self.exact else None
        # cutting text after "\n" changes no id when "\n" is a piece of its own that no other
        # piece contains (lbdl makes it a user-defined symbol)
        self._newline_atomic = (self.exact and self.piece_to_id("\n") is not None
                                and not any("\n" in p for p in self._pieces if p != "\n"))
        # only the user's special tokens are recognised in text: <bos>/<eos>/<pad> decode to
        # nothing, so reading them from text would break the round trip (use bos=/eos=)
        specials = {self._pieces[i]: i for i in self._user_special_ids}
        self._special_by_text = specials
        alternation = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})") if specials else None

    # --- loading and saving ----------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, num_threads: int = 0) -> "Tokenizer":
        """Load a tokenizer directory (tokenizer.model [+ tokenizer_config.json]) or a .model file."""
        file = model_path(path)
        try:
            data = file.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {file}: {e.strerror}") from None
        config = None
        config_file = file.parent / CONFIG_FILE
        if config_file.is_file():
            try:
                config = read_json(config_file)
            except DataError:
                config = None  # the config is informational (the model file is the tokenizer): one that
                # cannot be read, or is not a table, is ignored as if it were not there
        if config is not None and config.get("tokenizer_sha256") not in (None, hashlib.sha256(data).hexdigest()):
            config = None  # a stale config beside a replaced model file: ignore it
        if config is not None and not isinstance(config.get("training", {}), dict):
            config = {k: v for k, v in config.items() if k != "training"}  # a report that is not one
        return cls(data, path=file, config=config, num_threads=num_threads)

    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write `out/tokenizer.model` and `out/tokenizer_config.json` atomically."""
        config = {"format_version": FORMAT_VERSION, "type": "sentencepiece-bpe", "vocab_size": self.vocab_size,
                  "tokenizer_sha256": self.sha256, "special_tokens": self.special_tokens,
                  "user_special_tokens": self.user_special_tokens,
                  **{k: v for k, v in self.config.items()
                     if k not in ("format_version", "type", "vocab_size", "tokenizer_sha256", "special_tokens",
                                  "user_special_tokens")}}
        with atomic_dir(out, force=force) as tmp:
            (tmp / TOKENIZER_FILE).write_bytes(self.model_bytes)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.path = Path(out) / TOKENIZER_FILE
        self.config = config
        return Path(out)

    # --- vocabulary ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token and its id: <unk>, <bos>, <eos>, <pad>, then the user's."""
        out = {}
        for name, i in ((UNK, self.unk_id), (BOS, self.bos_id), (EOS, self.eos_id), (PAD, self.pad_id)):
            if i >= 0:
                out[self._pieces[i]] = i
        for i in sorted(self._user_special_ids):
            out[self._pieces[i]] = i
        return out

    @property
    def report(self) -> dict | None:
        """The training report saved beside the model, if any."""
        return self.config.get("training")

    def id_to_piece(self, id: int) -> str:
        if not 0 <= id < self._n:
            raise DataError(f"token id {id} is out of range for vocabulary size {self._n}")
        return self._pieces[id]

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if (i != self._sp.unk_id() or piece == self._pieces[i]) else None

    def is_special(self, id: int) -> bool:
        return id in self._control or id == self.unk_id

    def is_byte(self, id: int) -> bool:
        return self._sp.is_byte(id)

    def is_learned(self, id: int) -> bool:
        """A piece learned from text (not special, not a byte, not a line break)."""
        return not (self.is_special(id) or self._sp.is_byte(id) or self._pieces[id] in LINE_BREAKS)

    def longest_pieces(self, n: int = 10) -> list[str]:
        """The `n` longest learned pieces (in characters, a space mark counting as one)."""
        ids = [i for i in range(self._n) if self.is_learned(i)]
        ids.sort(key=lambda i: (-len(self._pieces[i]), i))
        return [self._pieces[i] for i in ids[:n]]

    # --- encoding --------------------------------------------------------------------

    def _segments(self, text: str, allow_special: bool) -> list:
        """`text` cut into strings for sentencepiece and lists of fixed ids, in order."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        parts = [text]
        if allow_special and self._special_re is not None:
            parts = []
            for k, part in enumerate(self._special_re.split(text)):
                if k % 2:
                    parts.append([self._special_by_text[part]])
                elif part:
                    parts.append(part)
        out = []
        for part in parts:
            if isinstance(part, list):
                out.append(part)
                continue
            if self._space_ids is not None and SPACE_MARK in part:
                for k, sub in enumerate(part.split(SPACE_MARK)):
                    if k:
                        out.append(self._space_ids)
                    self._chunk(sub, out)
            else:
                self._chunk(part, out)
        return out

    def _chunk(self, text: str, out: list) -> None:
        if len(text) <= CHUNK_CHARS or not self._newline_atomic:
            if text:
                out.append(text)
            return
        start, n = 0, len(text)
        while start < n:
            cut = text.find("\n", start + CHUNK_CHARS)
            end = n if cut < 0 else cut + 1
            out.append(text[start:end])
            start = end

    def _run(self, texts: Sequence[str], allow_special: bool, numpy: bool = False):
        """Encode many texts in one multithreaded sentencepiece call; per text, a list of parts."""
        layouts, jobs = [], []
        for text in texts:
            layout = []
            for seg in self._segments(text, allow_special):
                if isinstance(seg, str):
                    layout.append(len(jobs))
                    jobs.append(seg)
                else:
                    layout.append(seg)
            layouts.append(layout)
        threads = self.num_threads if len(jobs) > 1 else 1
        try:
            if numpy:
                results = self._sp.encode_as_numpy(jobs, num_threads=threads) if jobs else []
            else:
                results = self._sp.encode(jobs, num_threads=threads) if jobs else []
        except (RuntimeError, TypeError):  # a str that is not UTF-8 encodable: a lone surrogate
            for text in texts:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(f"text holds a lone surrogate {text[e.start]!r} at index {e.start}, which is "
                                    f"not valid Unicode text; repair the text (e.g. decode with errors='replace')"
                                    ) from None
            raise
        return [[results[p] if isinstance(p, int) else p for p in layout] for layout in layouts]

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; `decode(encode(text)) == text` for every str.

        User special tokens written in the text stay ordinary text unless
        `allow_special` is set, which turns them into their single ids.
        <bos>/<eos> come only from `bos`/`eos`, never from the text.
        """
        return self.encode_batch([text], bos=bos, eos=eos, allow_special=allow_special)[0]

    def encode_batch(self, texts: Iterable[str], bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, on every core."""
        texts = list(texts)
        out = []
        for parts in self._run(texts, allow_special):
            ids = [self.bos_id] if bos else []
            for p in parts:
                ids.extend(p)
            if eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def encode_concat(self, texts: Iterable[str], eos: bool = False, dtype=None):
        """All texts' ids in one numpy array, each text followed by <eos> if `eos` (corpus shards)."""
        import numpy as np

        dtype = dtype or np.int32
        eos_arr = np.array([self.eos_id], dtype=dtype)
        arrays = []
        for parts in self._run(list(texts), allow_special=False, numpy=True):
            arrays.extend(np.asarray(p, dtype=dtype) for p in parts)
            if eos:
                arrays.append(eos_arr)
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    def pieces(self, text: str, allow_special: bool = False) -> list[str]:
        return [self._pieces[i] for i in self.encode(text, allow_special=allow_special)]

    # --- decoding --------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`. <bos>/<eos>/<pad> decode to nothing; user special tokens to their
        text (or to nothing with `skip_special`)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        if not ids:
            return ""
        try:
            lo, hi = min(ids), max(ids)
        except TypeError:
            raise DataError("token ids must be integers") from None
        if lo < 0 or hi >= self._n:
            bad = lo if lo < 0 else hi
            raise DataError(f"token id {bad} is out of range for vocabulary size {self._n}")
        if skip_special or self._user_special_ids.isdisjoint(ids):
            return self._sp.decode(ids)
        out, run = [], []
        for i in ids:
            if i in self._user_special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._pieces[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special: bool = False) -> list[str]:
        return [self.decode(ids, skip_special=skip_special) for ids in batch]

    # --- measuring -------------------------------------------------------------------

    def compression(self, text: str) -> dict:
        """Characters and UTF-8 bytes per token of `text` (higher is better)."""
        tokens = int(self.encode_concat([text]).size) if text else 0
        chars, nbytes = len(text), len(text.encode("utf-8"))
        return {"chars": chars, "bytes": nbytes, "tokens": tokens,
                "chars_per_token": chars / tokens if tokens else 0.0,
                "bytes_per_token": nbytes / tokens if tokens else 0.0}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"
