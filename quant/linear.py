"""The runtime: modules that keep packed weights and multiply with them.

`QuantLinear` replaces an `nn.Linear`, `QuantEmbedding` an `nn.Embedding`
(whose weight may double as the tied output head). Both keep only packed
data, never a float copy of the weight:

- On CPU, every affine format (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k)
  runs on torch's packed int4 kernel `_weight_int4pack_mm_for_cpu` (group
  size 32, bfloat16 activations), whose weights are x = s (p - 8) + z per
  group. 4-bit codes map onto one plane: x = d (q - 8) + (m + 8 d) for Q4_1,
  zero 0 for Q4_0. Codes of 5 or 8 bits are split as q = 16 h + l into two
  4-bit planes sharing the scales; the high plane multiplies 16 x and the
  two products are summed (see `Int4Planes`). The original block bytes are
  dropped; the blocks' scale headers are kept so that the exact bytes can be
  rebuilt (`packed()`, `state_dict()`).
- Elsewhere (CUDA, NF4, a kernel-less torch) the block bytes are kept and
  dequantized on the fly into the activations' dtype for each product.

`module.weight` is a `QuantWeight`: a tensor-like object that `F.linear` and
`F.embedding` accept (through `__torch_function__`), so a model that computes
its head as `F.linear(x, tok_emb.weight)` runs the packed kernel unchanged;
`.dequantize()` gives a float copy when one is really wanted. The state dict
holds the packed bytes (uint8) under the usual `...weight` name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import Format, dequantize, get_format, quantize
from .int4pack import ROW_CHUNK, Int4Planes, int4_layout

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

    def stride(self, dim: int | None = None):
        # Packed weights have no float memory layout to change. They report the strides of the
        # column-major layout that layout passes (sample.inference_layout) aim for, so that such a
        # pass leaves them alone instead of trying to transpose them.
        strides = (1, self.module.out_features)
        return strides if dim is None else strides[dim]

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

        if func is F.linear and isinstance(arg(1, "weight"), QuantWeight) and not isinstance(arg(0, "input"), QuantWeight):
            return arg(1, "weight").module.linear(arg(0, "input"), arg(2, "bias"))
        if func is F.embedding and isinstance(arg(1, "weight"), QuantWeight):
            return arg(1, "weight").module.lookup(arg(0, "input"))
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"{name} is not supported on a quantized weight; call .dequantize() for a float copy")


# --- modules ------------------------------------------------------------------------------------------------


class QuantModule(nn.Module):
    """Packed storage shared by QuantLinear and QuantEmbedding: a (out_features, in_features) weight."""

    def __init__(self, fmt: str | Format, out_features: int, in_features: int, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt = get_format(fmt)
        self.out_features, self.in_features = out_features, in_features
        self.dtype = dtype  # the float dtype the module takes and returns
        self.backend = "auto"  # "auto": the packed CPU kernel where it applies; "blocks": always dequantize
        self._planes: Int4Planes | None = None
        self._buffers["weight"] = torch.empty(out_features, self.fmt.row_bytes(in_features), dtype=torch.uint8,
                                              device=device)

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self)

    @property
    def device(self) -> torch.device:
        return self._planes.header.device if self._planes is not None else self._buffers["weight"].device

    @property
    def kernel(self) -> str:
        """Which path a product takes: "int4pack" (torch's packed CPU kernel) or "dequantize"."""
        return "int4pack" if self._planes is not None else "dequantize"

    def set_packed(self, blocks: torch.Tensor) -> None:
        """Take packed rows (out_features, row_bytes) and build the fastest runtime form for their device."""
        expected = (self.out_features, self.fmt.row_bytes(self.in_features))
        if tuple(blocks.shape) != expected or blocks.dtype != torch.uint8:
            raise ValueError(f"packed {self.fmt.name} weight must be uint8 {list(expected)}, got "
                             f"{blocks.dtype} {list(blocks.shape)}")
        self._planes = None
        self._buffers["weight"] = blocks
        self._build()

    def _build(self) -> None:
        blocks = self._buffers.get("weight")
        if (blocks is None or blocks.device.type != "cpu" or self.backend != "auto" or not self.fmt.affine
                or int4_layout() is None):
            return
        with torch.inference_mode(False), torch.no_grad():
            self._planes = Int4Planes(self.fmt, blocks, self.out_features, self.in_features)
        del self._buffers["weight"]  # the planes and headers are now the only copy

    def set_backend(self, backend: str) -> None:
        """"auto" (packed CPU kernels where they apply) or "blocks" (dequantize on the fly; what training needs)."""
        if backend not in ("auto", "blocks"):
            raise ValueError(f"backend must be auto or blocks, got {backend!r}")
        blocks = self.packed()
        self.backend = backend
        self.set_packed(blocks)

    def packed(self) -> torch.Tensor:
        """The packed rows, byte for byte as stored."""
        if self._planes is not None:
            return self._planes.blocks()
        return self._buffers["weight"]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A float copy (out_features, in_features) of the weight."""
        dtype = dtype or self.dtype
        if self._planes is not None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype)
            for r in range(0, self.out_features, ROW_CHUNK):
                rows = torch.arange(r, min(r + ROW_CHUNK, self.out_features))
                out[r:r + ROW_CHUNK] = self._planes.rows(rows, dtype)
            return out
        return dequantize(self._buffers["weight"], self.fmt, dtype=dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), in x's dtype."""
        if self._planes is not None and not (torch.is_grad_enabled() and x.requires_grad):
            if x.device.type != "cpu":
                raise RuntimeError(f"input on {x.device} but the quantized weight is on cpu; move the model with .to()")
            shape = x.shape
            y = self._planes.matmul(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous())
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if bias is None else y + bias

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the weight for token ids idx (...) -> (..., in_features) in self.dtype."""
        flat = idx.reshape(-1)
        if self._planes is not None:
            rows = self._planes.rows(flat.cpu(), self.dtype)
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
        self._planes = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._buffers["weight"].device.type != "meta":
            self._build()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .float(): move the packed bytes, rebuild the runtime form for the new device
        if self._planes is not None:
            self._buffers["weight"] = self._planes.blocks()
            self._planes = None
        probe = fn(torch.empty(0, dtype=self.dtype, device=self._buffers["weight"].device))
        self.dtype = probe.dtype
        out = super()._apply(fn, recurse)
        if self._buffers["weight"].device.type != "meta":
            self._build()
        return out

    def runtime_tensors(self) -> list[torch.Tensor]:
        """Every tensor the module holds (for memory accounting and tests)."""
        held = list(self._planes.tensors()) if self._planes is not None else []
        own = list(self._buffers.values()) + list(self._parameters.values())
        return held + [t for t in own if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.runtime_tensors())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.fmt.name}, "
                f"kernel={self.kernel}")


class QuantLinear(QuantModule):
    """nn.Linear with a packed weight: y = x W^T + b, W dequantized on the fly or never (packed kernels)."""

    def __init__(self, in_features: int, out_features: int, fmt: str | Format, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(fmt, out_features, in_features, device=device, dtype=dtype)
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
                 dtype: torch.dtype = torch.float32):
        super().__init__(fmt, num_embeddings, embedding_dim, device=device, dtype=dtype)
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
                   progress=None) -> nn.Module:
    """Replace, in place, each named weight's module (`blocks.0.mlp.up_proj.weight` -> its nn.Linear) by its
    quantized twin of the given type. The float weights are released as each module is swapped."""
    importance = importance or {}
    for tensor_name, fmt in types.items():
        name = module_name(tensor_name)
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            new = QuantLinear.from_linear(old, fmt, name=tensor_name, importance=importance.get(tensor_name))
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding.from_embedding(old, fmt, name=tensor_name, importance=importance.get(tensor_name))
        else:
            raise ValueError(f"{tensor_name}: cannot quantize a {type(old).__name__}")
        _swap(model, name, new)
        if progress is not None:
            progress(1)
    return model


def prepare_quantized(model: nn.Module, types: dict[str, str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap each named weight's module for an empty quantized module on the same device (meta, to load into)."""
    for tensor_name, fmt in types.items():
        name = module_name(tensor_name)
        old = model.get_submodule(name)
        device = old.weight.device
        if isinstance(old, nn.Linear):
            new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None, device=device,
                              dtype=dtype)
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, device=device, dtype=dtype)
        else:
            raise ValueError(f"{tensor_name}: a {type(old).__name__} cannot hold a quantized weight")
        _swap(model, name, new)
    return model


def quant_modules(model: nn.Module) -> dict[str, QuantModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every quantized module: "blocks" dequantizes on the fly (autograd through the input, QLoRA);
    "auto" uses the packed CPU kernels where they apply."""
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
