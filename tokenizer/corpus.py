"""Reading a text corpus: file lists and globs, streamed lines, checked as UTF-8 text.

Files are read line by line (only `\\n` ends a line; `\\r` stays in the text),
so a corpus larger than memory streams through. Every failure names the file
and, where it applies, the byte offset.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Iterator

from lbdl_cli.errors import DataError

from .config import INVALID_UTF8_CHOICES

_GLOB_CHARS = set("*?[")


def expand_files(patterns) -> list[Path]:
    """Files named by paths and globs (`**` recurses), in the order given, each once."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"no file matches {pattern!r}; check the pattern "
                                f"(quote it so the shell leaves it to lbdl)")
            files.extend(Path(p) for p in matches)
            continue
        path = Path(pattern)
        if not path.exists():
            raise DataError(f"file not found: {pattern}")
        if path.is_dir():
            raise DataError(f"{pattern} is a directory; name its files or a glob such as '{pattern}/**/*.txt'")
        files.append(path)
    if not files:
        raise DataError("no input files given; name one or more text files")
    unique, seen = [], set()
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


class TextFile:
    """One corpus file read as lines; counts bytes and hashes them (sha256) as it goes."""

    def __init__(self, path: str | os.PathLike, invalid_utf8: str = "error"):
        if invalid_utf8 not in INVALID_UTF8_CHOICES:
            raise DataError(f"invalid_utf8 {invalid_utf8!r} must be one of {', '.join(INVALID_UTF8_CHOICES)}")
        self.path = Path(path)
        self.invalid_utf8 = invalid_utf8
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self.lines_skipped = 0  # lines dropped or repaired for invalid UTF-8
        self.lines = 0

    def __iter__(self) -> Iterator[str]:
        """Each line with its `\\n` ending (the last line may lack one)."""
        try:
            fh = open(self.path, "rb")
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror}") from None
        with fh:
            head = fh.read(8192)  # binary files usually show a NUL early, before any invalid UTF-8
            nul = head.find(b"\x00")
            if nul >= 0:
                raise DataError(f"{self.path} looks like a binary file (NUL byte at offset {nul}); "
                                f"pass UTF-8 text files")
            fh.seek(0)
            offset = 0
            for raw in fh:
                self.sha256.update(raw)
                self.bytes_read += len(raw)
                nul = raw.find(b"\x00")
                if nul >= 0:
                    raise DataError(f"{self.path} looks like a binary file (NUL byte at offset {offset + nul}); "
                                    f"pass UTF-8 text files")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if self.invalid_utf8 == "error":
                        raise DataError(
                            f"{self.path} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {offset + e.start}; "
                            f"convert the file to UTF-8 or pass --invalid-utf8 replace|skip") from None
                    self.lines_skipped += 1
                    if self.invalid_utf8 == "skip":
                        offset += len(raw)
                        continue
                    line = raw.decode("utf-8", errors="replace")
                offset += len(raw)
                self.lines += 1
                yield line

    @property
    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def total_bytes(files) -> int:
    return sum(os.path.getsize(f) for f in files)
