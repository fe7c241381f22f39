"""Reading user files: UTF-8 text and safetensors headers, with one-line errors that name the file.

Torch-free, layer 0: the tokenizer, the quantizer and the CLI read through here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import CheckpointError, DataError, LbdlError

MAX_HEADER = 100 << 20  # bytes: safetensors' own limit on a header


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """The whole of a UTF-8 text file; `what` ("calibration file") names it in errors."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise DataError(f"{name} does not exist" if not path.exists() else f"{name} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}, "__metadata__": ...}."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= MAX_HEADER:
                raise ValueError(f"header size {size}")
            header = json.loads(fh.read(size))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a table)")
    return header


def tensor_entries(path: str | os.PathLike) -> dict[str, dict]:
    """The header's tensor entries, without the metadata."""
    return {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}


def _named_text(path: str | os.PathLike, what: str, error: type[LbdlError]) -> tuple[str, str]:
    """(how errors name the file, its text); read_text's errors raised as `error`."""
    path = Path(path)
    try:
        return (f"{what} {path}" if what else str(path)), read_text(path, what)
    except DataError as e:
        raise error(str(e)) from None


def read_json(path: str | os.PathLike, what: str = "", error: type[LbdlError] = DataError, kind: type = dict):
    """A JSON file's value (a table unless `kind` says otherwise); one error naming the file, line and column."""
    name, text = _named_text(path, what, error)
    try:
        value = json.loads(text.removeprefix("\ufeff"))  # a byte-order mark, as Windows editors write
    except json.JSONDecodeError as e:
        raise error(f"{name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                    f"fix it or write it again") from None
    if not isinstance(value, kind):
        raise error(f"{name} must hold a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                    f"not {_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


def read_jsonl(path: str | os.PathLike, what: str = "", error: type[LbdlError] = DataError):
    """(line number, table) of each non-blank line of a JSON-lines file; one error naming the file and line."""
    name, text = _named_text(path, what, error)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{name}:{number}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the line") \
                from None
        if not isinstance(record, dict):
            raise error(f"{name}:{number}: expected a JSON object ({{...}}), got {_JSON_NAMES.get(type(record))}")
        yield number, record


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def inside(root: str | os.PathLike, entry: str, what: str, error: type[LbdlError] = CheckpointError) -> Path:
    """`root/entry`, refused when it resolves (through `..` or symbolic links) outside `root`."""
    root = Path(root)
    path = root / entry
    if Path(entry).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise error(f"{what} {entry!r} points outside {root}; every file it names must be inside that directory")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
