"""Safetensors files one tensor at a time, as a merge streams them.

SafetensorsWriter writes the header first (names, dtypes and shapes are known before any data), then each
tensor's bytes in header order; safetensors' own `save_file` takes the whole dict. TensorReader reads one tensor
with a plain positioned read into memory of its own, freed with the tensor; safetensors' `safe_open` maps the
file, and every page read stays resident until the file is closed, so streaming a model through it ends with
the whole file in the process's resident memory. The format is safetensors' (an 8-byte little-endian header
length, the JSON header padded with spaces to 8 bytes, the data).

    with SafetensorsWriter(path, {"a": (torch.float32, (2, 3))}) as w:
        w.write("a", TensorReader(other).get("a"))
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import safetensors_header

NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8", torch.int8: "I8",
         torch.int32: "I32", torch.int64: "I64"}
DTYPES = {name: dtype for dtype, name in NAMES.items()}


class TensorReader:
    """Tensors of one safetensors file, each read on demand: `entries` {name: (dtype, shape)}, `get(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = safetensors_header(self.path)
        with open(self.path, "rb") as f:
            self.data_start = 8 + int.from_bytes(f.read(8), "little")
        self.offsets, self.entries = {}, {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {entry.get('dtype')!r}, which lbdl does "
                                      f"not read")
            self.entries[name] = (DTYPES[entry["dtype"]], tuple(entry["shape"]))
            self.offsets[name] = tuple(entry["data_offsets"])

    def get(self, name: str) -> torch.Tensor:
        dtype, shape = self.entries[name]
        begin, end = self.offsets[name]
        with open(self.path, "rb") as f:
            data = bytearray(os.pread(f.fileno(), end - begin, self.data_start + begin))
        if len(data) != end - begin:
            raise CheckpointError(f"{self.path} is truncated (tensor {name}); re-save or re-download it")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


class SafetensorsWriter:
    """Write `entries` {name: (dtype, shape)} to `path`, in that order, one `write(name, tensor)` each; `close()`
    (the context's exit) checks that every tensor came."""

    def __init__(self, path: str | os.PathLike, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.entries, self.order = Path(path), dict(entries), list(entries)
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, (dtype, shape) in self.entries.items():
            if dtype not in NAMES:
                raise CheckpointError(f"tensor {name}: dtype {dtype} cannot be written to safetensors by lbdl")
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.done = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.done >= len(self.order) or name != self.order[self.done]:
            expected = self.order[self.done] if self.done < len(self.order) else "nothing more"
            raise CheckpointError(f"tensor {name} written out of order: {expected} comes next")
        dtype, shape = self.entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)} but the header says "
                                  f"{dtype} {list(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.file.write(data.numpy().tobytes())
        self.done += 1

    def close(self) -> None:
        self.file.close()
        if self.done != len(self.order):
            raise CheckpointError(f"{self.path}: {len(self.order) - self.done} of {len(self.order)} tensors were "
                                  f"never written (next: {self.order[self.done]})")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()  # the caller's atomic directory throws the partial file away
