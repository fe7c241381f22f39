"""Reading user files: UTF-8 text and safetensors headers, with one-line errors that name the file.

Torch-free, layer 0: the tokenizer, the quantizer and the CLI read through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError, DataError

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
