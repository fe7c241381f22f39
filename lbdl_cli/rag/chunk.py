"""Documents into chunks (LBDL 8.1): files read as UTF-8 text, cut into pieces of at most `chunk_tokens` tokens.

    from lbdl_cli.rag.chunk import ChunkConfig, collect_files, read_document, chunk_text
    files = collect_files(["docs/", "README.md"])       # directories walked, sorted, junk left out
    text, sha = read_document(files[0].path)                      # a binary file raises Skipped(reason)
    chunks = chunk_text(text, files[0].name, sha, tok, ChunkConfig(chunk_tokens=256, overlap=32))

A file is a list of lines; a line longer than `chunk_tokens` is cut at token boundaries into pieces. A chunk
is a run of those units cut, in order of preference, before a markdown heading, at a paragraph boundary (after
a blank line), at a line boundary, inside an over-long line; it ends at the best such boundary in the second
half of its budget or before any heading (else where the budget ends). The next chunk starts up to `overlap`
tokens of whole lines earlier (none before a heading), so a passage cut in two is whole in one of them. Each
chunk keeps its path, its line span (1-based, inclusive), the file's sha256, its text, its token count and a
stable id.

Torch-free, layer 7.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, setting
from ..errors import ConfigError, DataError

JUNK = {"__pycache__", "node_modules", "venv", ".venv", "build", "dist", "site-packages", ".git", ".hg", ".svn",
        ".tox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}
MARKDOWN = {".md", ".markdown", ".mdx", ".rst"}
HEADING, PARAGRAPH, LINE, INSIDE = 3, 2, 1, 0  # how good a cut before a unit is


@dataclass(frozen=True)
class ChunkConfig(Config):
    """How documents are cut into chunks."""

    chunk_tokens: int = setting(256, "The most tokens of a chunk (the index's tokenizer).", low=8, high=1 << 16)
    overlap: int = setting(32, "Tokens of whole lines that consecutive chunks share (less than --chunk-tokens).",
                           low=0, high=1 << 16)

    def __post_init__(self):
        super().__post_init__()
        if self.overlap >= self.chunk_tokens:
            raise ConfigError(f"chunk config: overlap {self.overlap} must be less than chunk_tokens "
                              f"{self.chunk_tokens}; lower --overlap")


@dataclass(frozen=True)
class Chunk:
    id: str
    path: str
    first_line: int
    last_line: int
    file_sha256: str
    tokens: int
    text: str

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "first_line": self.first_line, "last_line": self.last_line,
                "file_sha256": self.file_sha256, "tokens": self.tokens, "text": self.text}

    @property
    def where(self) -> str:
        return f"{self.path}:{self.first_line}-{self.last_line}"


class Skipped(Exception):
    """A document that is not indexed: binary, unreadable, empty. Its message is the reason."""


@dataclass(frozen=True)
class Document:
    path: Path  # where it is read
    name: str  # how the index names it


# --- finding and reading files ---------------------------------------------------------------------------------


def _junk(name: str) -> bool:
    return name.startswith(".") or name in JUNK or name.endswith(".egg-info")


def collect_files(docs: list[str], exclude: str | os.PathLike | None = None) -> list[Document]:
    """The files named by `docs`: files as given, directories walked in sorted order without hidden or junk
    entries (and without `exclude`, the index being written). A path that does not exist is a DataError."""
    if not docs:
        raise DataError("no documents given; name the files or directories to index")
    skip = Path(exclude).resolve() if exclude is not None else None
    out, seen = [], set()

    def add(path: Path, name: str):
        key = path.resolve()
        if key in seen or (skip is not None and (key == skip or key.is_relative_to(skip))):
            return
        seen.add(key)
        out.append(Document(path, os.path.normpath(name)))

    for given in docs:
        root = Path(given)
        if not root.exists():
            raise DataError(f"document {given} does not exist; fix the path")
        if not root.is_dir():
            add(root, str(given))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _junk(d))
            here = Path(dirpath)
            for f in sorted(filenames):
                if not _junk(f):
                    add(here / f, str(here / f))
    return out


def read_document(path: str | os.PathLike) -> tuple[str, str]:
    """(text, sha256 of the bytes) of a UTF-8 text file; Skipped(reason) for a binary, unreadable or empty one."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise Skipped(f"unreadable ({e.strerror or e})") from None
    if b"\0" in data:
        raise Skipped("binary (holds NUL bytes)")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise Skipped(f"not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise Skipped("empty (no text)")
    return text, hashlib.sha256(data).hexdigest()


# --- cutting ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    line: int  # 1-based line number
    text: str
    tokens: int
    cut: int  # quality of a cut before this unit


def _units(text: str, tok, chunk_tokens: int, markdown: bool) -> list[_Unit]:
    """The lines of `text` (an over-long line as pieces of at most chunk_tokens tokens), each with its tokens and
    the quality of a cut before it."""
    lines = text.splitlines(keepends=True)
    ids = tok.encode_batch(lines)
    units, fence, blank_before = [], False, True
    for n, (line, line_ids) in enumerate(zip(lines, ids), 1):
        stripped = line.strip()
        if markdown and stripped.startswith(("```", "~~~")):
            fence = not fence
        if markdown and not fence and stripped.startswith("#") and stripped.lstrip("#").startswith(" "):
            cut = HEADING
        else:
            cut = PARAGRAPH if blank_before else LINE
        blank_before = not stripped
        if len(line_ids) <= chunk_tokens:
            units.append(_Unit(n, line, len(line_ids), cut))
            continue
        for i, start in enumerate(range(0, len(line_ids), chunk_tokens)):
            piece = line_ids[start:start + chunk_tokens]
            units.append(_Unit(n, tok.decode(piece), len(piece), cut if i == 0 else INSIDE))
    return units


def _end(units: list[_Unit], start: int, budget: int) -> int:
    """Where the chunk that starts at units[start] ends (exclusive): the best cut in the second half of the
    budget (or before any heading), the latest of equal ones; the whole rest when it fits."""
    total, end = 0, start
    while end < len(units) and total + units[end].tokens <= budget:
        total += units[end].tokens
        end += 1
    if end == len(units) or end == start + 1:
        return max(end, start + 1)
    best, best_at, size = -1, end, 0
    for i in range(start, end):
        size += units[i].tokens
        after = i + 1
        if (size * 2 >= budget or units[after].cut == HEADING) and units[after].cut >= best:
            best, best_at = units[after].cut, after
    return best_at


def _whole(units: list[_Unit], i: int) -> bool:
    """Whether units[i] is a whole line (not a piece of an over-long one)."""
    return units[i].cut != INSIDE and (i + 1 == len(units) or units[i + 1].cut != INSIDE)


def _next_start(units: list[_Unit], start: int, end: int, overlap: int, budget: int) -> int:
    """Where the chunk after [start, end) starts: up to `overlap` tokens of whole lines before `end`, never so
    far back that the next chunk could not pass `end`, and not on a blank line."""
    if end >= len(units):
        return end
    s, size = end, 0
    while s - 1 > start and _whole(units, s - 1) and size + units[s - 1].tokens <= overlap:
        s -= 1
        size += units[s].tokens
    if units[end].cut in (INSIDE, HEADING):  # never start inside a line's pieces; a section starts clean
        s = end
    while s < end and size + units[end].tokens > budget:
        size -= units[s].tokens
        s += 1
    while s < end and not units[s].text.strip():
        s += 1
    return s


def chunk_id(path: str, file_sha256: str, first: int, last: int, text: str) -> str:
    key = f"{path}\0{file_sha256}\0{first}\0{last}\0{text}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def chunk_text(text: str, path: str, file_sha256: str, tok, cfg: ChunkConfig | None = None) -> list[Chunk]:
    """The chunks of one document's text, in order."""
    cfg = cfg or ChunkConfig()
    markdown = Path(path).suffix.lower() in MARKDOWN
    units = _units(text, tok, cfg.chunk_tokens, markdown)
    chunks, start = [], 0
    while start < len(units):
        end = _end(units, start, cfg.chunk_tokens)
        piece = units[start:end]
        body = "".join(u.text for u in piece)
        n = len(tok.encode(body))
        while n > cfg.chunk_tokens and len(piece) > 1:  # a tokenizer whose pieces span a line break
            piece, end = piece[:-1], end - 1
            body = "".join(u.text for u in piece)
            n = len(tok.encode(body))
        if body.strip():
            first, last = piece[0].line, piece[-1].line
            chunks.append(Chunk(chunk_id(path, file_sha256, first, last, body), path, first, last, file_sha256, n,
                                body))
        start = _next_start(units, start, end, cfg.overlap, cfg.chunk_tokens)
    return chunks
