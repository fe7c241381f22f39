"""The runtime: modules that keep packed weights and multiply with them.

`QuantLinear` replaces an `nn.Linear`, `QuantEmbedding` an `nn.Embedding`
(whose weight may double as the tied output head). Both keep only packed
data, never a float copy of the weight, in the form their `backend` asks for
(the loader picks it per machine: lbdl_cli.kernels.quant_backend):

- "int4pack": on CPU, every affine format (q8_0, q4_0, q4_1, q5_0, q5_1,
  q4_k, q5_k) runs on torch's packed int4 kernel `_weight_int4pack_mm_for_cpu`
  (group size 32, bfloat16 activations), whose weights are x = s (p - 8) + z
  per group. 4-bit codes map onto one plane: x = d (q - 8) + (m + 8 d) for
  Q4_1, zero 0 for Q4_0. Codes of 5 or 8 bits are split as q = 16 h + l into
  two 4-bit planes sharing the scales; the high plane multiplies 16 x and the
  two products are summed (see `Int4Planes`).
- "dequantize": every affine format keeps one byte per code and a float32
  scale and offset per group of 32 (`GroupCodes`); a product dequantizes the
  matrix into a float buffer that every product of the thread reuses, exactly
  as the stored blocks give it, then runs F.linear: the fastest exact path on
  CPUs where torch's packed kernel is slow.
- "blocks" (and NF4, and "int4pack" where the kernel does not apply: CUDA, a
  kernel-less torch): the block bytes are kept and dequantized into a fresh
  tensor for each product (what autograd through the input, QLoRA, needs).

The first two drop the original block bytes but keep the blocks' scale
headers, so that the exact bytes can be rebuilt (`packed()`, `state_dict()`).

`module.weight` is a `QuantWeight`: a tensor-like object that `F.linear` and
`F.embedding` accept (through `__torch_function__`), so a model that computes
its head as `F.linear(x, tok_emb.weight)` runs the packed kernel unchanged;
`.dequantize()` gives a float copy when one is really wanted. The state dict
holds the packed bytes (uint8) under the usual `...weight` name.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from lbdl_cli.progress import Progress, report

from .formats import GROUP, Format, codes, dequantize, get_format, group_affine, pack_codes, quantize
from .int4pack import ROW_CHUNK, Int4Planes, int4_layout

BACKENDS = ("int4pack", "dequantize", "blocks")

# --- the weight as F.linear / F.embedding see it ---------------------------------------------------------


class QuantWeight:
    """A packed weight standing where a float weight tensor is expected (F.linear, F.embedding)."""

    def __init__(self, module: "QuantModule"):
        self.module = module

    shape = property(lambda self: torch.Size((self.module.out_features, self.module.in_features)))
    dtype = property(lambda self: self.module.dtype)
    device = property(lambda self: self.module.device)
    qtype = property(lambda self: self.module.fmt.name)
    requires_grad = False
    is_meta = property(lambda self: self.device.type == "meta")

    def is_floating_point(self) -> bool:  # it stands for a float weight
        return True

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.module.dequantize(dtype)

    def __repr__(self):
        return f"QuantWeight({self.qtype}, shape={tuple(self.shape)}, device={self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def arg(i, name):
            return args[i] if len(args) > i else kwargs.get(name)

        weight = arg(1, "weight")
        if func is F.linear and isinstance(weight, QuantWeight) and not isinstance(arg(0, "input"), QuantWeight):
            return weight.module.linear(arg(0, "input"), arg(2, "bias"))
        if func is F.embedding and isinstance(weight, QuantWeight):
            return weight.module.lookup(arg(0, "input"))
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"{name} is not supported on a quantized weight; call .dequantize() for a float copy")


# --- the dequantizing form ------------------------------------------------------------------------------------


class GroupCodes:
    """An affine weight (N, K) as one uint8 code per weight and a float32 scale s and offset z per group of 32
    (1.25 bytes a weight, plus the blocks' headers), stored input-major: codes (K / 32, 32, N), s and z
    (K / 32, 1, N), so that dequantizing is one vectorised pass over rows of N (x = s q + z, with s q exact in
    float32: the very numbers the stored blocks give) whose result is the weight's column-major layout."""

    def __init__(self, fmt: Format, blocks: torch.Tensor, N: int, K: int):
        self.fmt, self.N, self.K = fmt, N, K
        device = blocks.device
        self.header = torch.empty(N, K // fmt.block_size, fmt.header_size, dtype=torch.uint8, device=device)
        self.q = torch.empty(K // GROUP, GROUP, N, dtype=torch.uint8, device=device)
        self.s = torch.empty(K // GROUP, 1, N, device=device)
        self.z = torch.empty(K // GROUP, 1, N, device=device)
        for r in range(0, N, ROW_CHUNK):
            q, header = codes(blocks[r:r + ROW_CHUNK], fmt)  # (n, K) uint8, (n, nb, h)
            s, z = group_affine(header, fmt)  # (n, K / 32) float32
            n = q.shape[0]
            self.header[r:r + n] = header
            self.q[:, :, r:r + n] = q.T.reshape(K // GROUP, GROUP, n)
            self.s[:, 0, r:r + n], self.z[:, 0, r:r + n] = s.T, z.T

    def weight(self, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
        """The float weight (N, K), column-major: in this thread's reused buffer, or (reuse False: autograd
        keeps it) a fresh tensor."""
        out = _buffer(self.N * self.K, dtype, self.q.device) if reuse else torch.empty(
            self.N * self.K, dtype=dtype, device=self.q.device)
        torch.addcmul(self.z, self.q, self.s, out=out.view(self.q.shape))
        return out.view(self.K, self.N).t()

    def rows(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        """Dequantized rows (len(rows), K), exactly as the stored blocks give them."""
        rows = rows.to(self.q.device)
        x = self.q[:, :, rows] * self.s[:, :, rows] + self.z[:, :, rows]  # (K / 32, 32, len(rows))
        return x.reshape(self.K, -1).t().to(dtype)

    def blocks(self) -> torch.Tensor:
        parts = []
        for r in range(0, self.N, ROW_CHUNK):
            q = self.q[:, :, r:r + ROW_CHUNK].reshape(self.K, -1).t().contiguous()
            parts.append(pack_codes(q, self.header[r:r + ROW_CHUNK], self.fmt))
        return torch.cat(parts)

    def tensors(self) -> list[torch.Tensor]:
        return [self.header, self.q, self.s, self.z]


_BUFFERS = threading.local()  # per thread: {(dtype, device): the float buffer GroupCodes dequantizes into}


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`numel` entries of this thread's buffer for (dtype, device), grown to the largest matrix it has held.
    One per thread, so that two generations running at once never write into each other's weights."""
    held = _BUFFERS.__dict__.setdefault("by_kind", {})
    buffer = held.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):
            buffer = held[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


# --- modules ------------------------------------------------------------------------------------------------


class QuantModule(nn.Module):
    """Packed storage shared by QuantLinear and QuantEmbedding: a (out_features, in_features) weight."""

    def __init__(self, fmt: str | Format, out_features: int, in_features: int, device=None,
                 dtype: torch.dtype = torch.float32, backend: str = "int4pack"):
        super().__init__()
        _check_backend(backend)
        self.fmt = get_format(fmt)
        self.out_features, self.in_features = out_features, in_features
        self.dtype = dtype  # the float dtype the module takes and returns
        self.backend = backend  # the runtime form asked for (see the module docstring)
        self._form: Int4Planes | GroupCodes | None = None  # None: the block bytes in _buffers["weight"]
        self._buffers["weight"] = torch.empty(out_features, self.fmt.row_bytes(in_features), dtype=torch.uint8,
                                              device=device)

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self)

    @property
    def device(self) -> torch.device:
        return self._form.header.device if self._form is not None else self._buffers["weight"].device

    @property
    def kernel(self) -> str:
        """The form a product takes: "int4pack" (torch's packed CPU kernel), "dequantize" (codes dequantized
        into a reused buffer) or "blocks" (the block bytes dequantized for each product)."""
        if isinstance(self._form, Int4Planes):
            return "int4pack"
        return "dequantize" if isinstance(self._form, GroupCodes) else "blocks"

    def set_packed(self, blocks: torch.Tensor) -> None:
        """Take packed rows (out_features, row_bytes) and build the runtime form the backend asks for."""
        expected = (self.out_features, self.fmt.row_bytes(self.in_features))
        if tuple(blocks.shape) != expected or blocks.dtype != torch.uint8:
            raise ValueError(f"packed {self.fmt.name} weight must be uint8 {list(expected)}, got "
                             f"{blocks.dtype} {list(blocks.shape)}")
        self._form = None
        self._buffers["weight"] = blocks
        self._build()

    def _build(self) -> None:
        blocks = self._buffers.get("weight")
        if blocks is None or not self.fmt.affine or self.backend == "blocks":
            return
        if self.backend == "int4pack" and (blocks.device.type != "cpu" or int4_layout() is None):
            return
        form = Int4Planes if self.backend == "int4pack" else GroupCodes
        with torch.inference_mode(False), torch.no_grad():
            self._form = form(self.fmt, blocks, self.out_features, self.in_features)
        del self._buffers["weight"]  # the runtime form and the headers are now the only copy

    def set_backend(self, backend: str) -> None:
        """"int4pack", "dequantize" or "blocks" (see the module docstring); the bytes are kept exactly."""
        _check_backend(backend)
        blocks = self.packed()
        self.backend = backend
        self.set_packed(blocks)

    def packed(self) -> torch.Tensor:
        """The packed rows, byte for byte as stored."""
        if self._form is not None:
            return self._form.blocks()
        return self._buffers["weight"]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A float copy (out_features, in_features) of the weight."""
        dtype = dtype or self.dtype
        if self._form is not None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.device)
            for r in range(0, self.out_features, ROW_CHUNK):
                rows = torch.arange(r, min(r + ROW_CHUNK, self.out_features))
                out[r:r + ROW_CHUNK] = self._form.rows(rows, dtype)
            return out
        return dequantize(self._buffers["weight"], self.fmt, dtype=dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), in x's dtype. When a gradient must flow back through x (adapters upstream, QLoRA),
        W is dequantized in the forward and again in the backward, never kept in between."""
        grad = torch.is_grad_enabled() and x.requires_grad
        if grad:
            y = _DequantizedLinear.apply(x, self)
        elif isinstance(self._form, Int4Planes):
            if x.device.type != "cpu":
                raise RuntimeError(f"input on {x.device} but the quantized weight is on cpu; move the model with .to()")
            shape = x.shape
            y = self._form.matmul(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous())
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        elif isinstance(self._form, GroupCodes):
            y = F.linear(x, self._form.weight(x.dtype, reuse=True))
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if bias is None else y + bias

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the weight for token ids idx (...) -> (..., in_features) in self.dtype."""
        flat = idx.reshape(-1)
        if self._form is not None:
            rows = self._form.rows(flat.cpu() if isinstance(self._form, Int4Planes) else flat, self.dtype)
        else:
            rows = dequantize(self._buffers["weight"][flat], self.fmt, dtype=self.dtype)
        return rows.reshape(*idx.shape, self.in_features)

    # the state dict always holds the packed bytes under `weight`, whatever the runtime form
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "weight" not in self._buffers:
            destination[prefix + "weight"] = self.packed()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if "weight" not in self._buffers:
            self._buffers["weight"] = torch.empty(self.out_features, self.fmt.row_bytes(self.in_features),
                                                  dtype=torch.uint8, device=self.device)
        self._form = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._buffers["weight"].device.type != "meta":
            self._build()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .float(): move the packed bytes, rebuild the runtime form for the new device
        if self._form is not None:
            self._buffers["weight"] = self._form.blocks()
            self._form = None
        probe = fn(torch.empty(0, dtype=self.dtype, device=self._buffers["weight"].device))
        self.dtype = probe.dtype
        out = super()._apply(fn, recurse)
        if self._buffers["weight"].device.type != "meta":
            self._build()
        return out

    def runtime_tensors(self) -> list[torch.Tensor]:
        """Every tensor the module holds (for memory accounting and tests)."""
        held = list(self._form.tensors()) if self._form is not None else []
        own = list(self._buffers.values()) + list(self._parameters.values())
        return held + [t for t in own if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.runtime_tensors())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.fmt.name}, "
                f"kernel={self.kernel}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T with W a quantized module's weight: the backward dequantizes W again (one layer at a time)
    instead of the graph holding every layer's float copy until then. The weight is frozen: no gradient."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(grad.dtype), None


class QuantLinear(QuantModule):
    """nn.Linear with a packed weight: y = x W^T + b, W dequantized on the fly or never (packed kernels)."""

    def __init__(self, in_features: int, out_features: int, fmt: str | Format, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32, backend: str = "int4pack"):
        super().__init__(fmt, out_features, in_features, device=device, dtype=dtype, backend=backend)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str | Format, name: str = "linear",
                    importance: torch.Tensor | None = None) -> "QuantLinear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None, device=w.device,
                dtype=w.dtype)
        q.set_packed(quantize(w, q.fmt, name=name, importance=importance))
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)


class QuantEmbedding(QuantModule):
    """nn.Embedding with a packed table (num_embeddings, embedding_dim); its weight can serve as a tied head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str | Format, device=None,
                 dtype: torch.dtype = torch.float32, backend: str = "int4pack"):
        super().__init__(fmt, num_embeddings, embedding_dim, device=device, dtype=dtype, backend=backend)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str | Format, name: str = "embedding",
                       importance: torch.Tensor | None = None) -> "QuantEmbedding":
        w = emb.weight
        q = cls(emb.num_embeddings, emb.embedding_dim, fmt, device=w.device, dtype=w.dtype)
        q.set_packed(quantize(w, q.fmt, name=name, importance=importance))
        return q

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lookup(idx)


# --- whole models -----------------------------------------------------------------------------------------------


def module_name(tensor_name: str) -> str:
    if not tensor_name.endswith(".weight"):
        raise ValueError(f"{tensor_name} is not a weight")
    return tensor_name[: -len(".weight")]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, types: dict[str, str], importance: dict[str, torch.Tensor] | None = None,
                   progress: Progress | None = None) -> nn.Module:
    """Replace, in place, each named weight's module (`blocks.0.mlp.up_proj.weight` -> its nn.Linear) by its
    quantized twin of the given type. The float weights are released as each module is swapped. Progress:
    stage "quantizing", one unit per tensor."""
    importance = importance or {}
    for done, (tensor_name, fmt) in enumerate(types.items(), 1):
        name = module_name(tensor_name)
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            new = QuantLinear.from_linear(old, fmt, name=tensor_name, importance=importance.get(tensor_name))
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding.from_embedding(old, fmt, name=tensor_name, importance=importance.get(tensor_name))
        else:
            raise ValueError(f"{tensor_name}: cannot quantize a {type(old).__name__}")
        _swap(model, name, new)
        report(progress, "quantizing", done, len(types), unit="tensors", status=tensor_name)
    return model


def prepare_quantized(model: nn.Module, types: dict[str, str], dtype: torch.dtype = torch.float32,
                      backend: str = "int4pack") -> nn.Module:
    """Swap each named weight's module for an empty quantized module on the same device (meta, to load into),
    whose packed bytes will take the runtime form of `backend`."""
    for tensor_name, fmt in types.items():
        name = module_name(tensor_name)
        old = model.get_submodule(name)
        device = old.weight.device
        if isinstance(old, nn.Linear):
            new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None, device=device,
                              dtype=dtype, backend=backend)
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, device=device, dtype=dtype,
                                 backend=backend)
        else:
            raise ValueError(f"{tensor_name}: a {type(old).__name__} cannot hold a quantized weight")
        _swap(model, name, new)
    return model


def quant_modules(model: nn.Module) -> dict[str, QuantModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every quantized module's runtime form: "int4pack" (torch's packed CPU kernel where it applies),
    "dequantize" (codes dequantized into a reused buffer) or "blocks" (the block bytes dequantized for each
    product: autograd through the input, QLoRA)."""
    for m in quant_modules(model).values():
        m.set_backend(backend)
    return model


def set_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The float dtype quantized modules take and return (what `model.tok_emb.weight.dtype` reports)."""
    for m in quant_modules(model).values():
        m.dtype = dtype
    return model


def finish_loading(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """After loading packed weights: set the modules' float dtype and give the heap pages that the
    conversions freed back to the OS (glibc keeps them otherwise, ~15% of a 4-bit model's size)."""
    set_dtype(model, dtype)
    try:
        import ctypes
        import sys

        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The inverse swap of quantize_model: every quantized module back to a float nn.Linear / nn.Embedding holding
    its dequantized weight (to merge an adapter into a quantized base, say). In place; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=m.device)
        elif isinstance(m, QuantEmbedding):
            new = nn.Embedding(m.num_embeddings, m.embedding_dim, dtype=dtype, device=m.device)
        else:
            continue
        with torch.no_grad():
            new.weight.copy_(m.dequantize(dtype))
            if isinstance(m, QuantLinear) and m.bias is not None:
                new.bias.copy_(m.bias)
        _swap(model, name, new)
    return model
