"""Block quantization formats: pure, vectorised torch functions, float tensor <-> packed bytes.

A quantized tensor of logical shape (..., K) is stored as a uint8 tensor of
shape (..., row_bytes(K)): every row (the input dimension of a linear layer, a
token's embedding) is packed on its own, so rows can be gathered (an
embedding lookup) and split (one shard per device) without unpacking.

The ggml types are llama.cpp's exact block layouts (ggml-common.h), so the
bytes of a row are the concatenated blocks a GGUF file holds for that row:

    q8_0  34 B / 32   d fp16 | qs int8[32]                        x = d q
    q4_0  18 B / 32   d fp16 | qs[16]                             x = d (q - 8)
    q4_1  20 B / 32   d fp16 | m fp16 | qs[16]                    x = d q + m
    q5_0  22 B / 32   d fp16 | qh[4] | qs[16]                     x = d (q - 16)
    q5_1  24 B / 32   d fp16 | m fp16 | qh[4] | qs[16]            x = d q + m
    q4_k 144 B / 256  d, dmin fp16 | scales[12] | qs[128]         x = d sc_j q - dmin m_j
    q5_k 176 B / 256  d, dmin fp16 | scales[12] | qh[32] | qs[128]

In qs, byte j of a 32-weight group holds element j in its low nibble and
element j + 16 in its high nibble (k-quants: 32-byte chunk c holds sub-block
2c low, 2c + 1 high); qh holds the fifth bits, bit j for element j (k-quants:
bit j of byte l for element l of sub-block j). The 6-bit sub-block scales and
mins of the k-quants are packed as get_scale_min_k4 reads them. Quantizing
with round-to-nearest gives bit-identical bytes to the `gguf` package's
reference (`gguf.quants`); q4_k/q5_k use llama.cpp's weighted least-squares
search for each sub-block's scale and min (make_qkx2_quants), and every
affine type can take an importance vector (squared input activations per
column, llama.cpp's imatrix) that weights that search instead.

NF4 (QLoRA, Dettmers et al. 2023) is not a ggml type; lbdl stores it in the
same row-wise spirit: per 64 weights an fp32 absmax then 32 bytes of 4-bit
codes (byte j: element j low nibble, element j + 32 high), 4.5 bits per
weight. `nf4_dq` double-quantizes the absmaxes: a row's absmax codes (one
byte per block, bitsandbytes' signed dynamic 8-bit map applied to absmax -
mean in groups of 256 blocks) follow its codes, then one fp32 scale per group
and the row's fp32 mean (QLoRA groups the flattened tensor; keeping groups
inside a row keeps rows independent, like every other format here).

Everything but NF4 is an affine group format: integer codes q in [0, 2^bits)
and, per group of 32 weights, a scale s and offset z with x = s q + z. The
runtime (quant/linear.py) uses exactly that view to drive torch's packed int4
kernels; `codes`, `pack_codes` and `group_affine` expose it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .catalog import TYPES, QuantError, type_name  # noqa: F401  (QuantError: re-exported)
from .kquants import quantize_kquant, search_scale_min, unpack_scale_min
from .nf4 import NF4_LEVELS, dequantize_nf4, dequantize_nf4_dq, quantize_nf4, quantize_nf4_dq, row_bytes_dq  # noqa: F401

GROUP = 32  # weights per scale in every affine format
CHUNK = 1 << 20  # weights quantized per step (bounds temporary memory)



@dataclass(frozen=True)
class Format:
    """One quantization type: its block, its bytes, its bits."""

    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    bits: int  # bits per code
    kind: str  # "legacy" | "kquant" | "nf4" | "nf4_dq"
    symmetric: bool  # x = s (q - c) with no separate offset
    ggml_type: int | None  # GGMLQuantizationType value, None for lbdl's own NF4 layouts
    description: str

    @property
    def header_size(self) -> int:
        """Bytes of a block that are not codes (scales and offsets)."""
        return {"legacy": 2 if self.symmetric else 4, "kquant": 16, "nf4": 4, "nf4_dq": 0}[self.kind]

    @property
    def affine(self) -> bool:
        return self.kind in ("legacy", "kquant")

    def row_bytes(self, k: int) -> int:
        nb = k // self.block_size
        if self.kind == "nf4_dq":
            return row_bytes_dq(nb)
        return nb * self.type_size

    def k_from_row_bytes(self, n: int) -> int:
        if self.kind == "nf4_dq":
            nb = max(0, (n - 4) // 33)
            while nb > 0 and self.row_bytes(nb * 64) > n:
                nb -= 1
            while self.row_bytes((nb + 1) * 64) <= n:
                nb += 1
            if self.row_bytes(nb * 64) != n:
                raise QuantError(f"{n} bytes is not a whole {self.name} row")
            return nb * 64
        if n % self.type_size:
            raise QuantError(f"{n} bytes is not a whole number of {self.name} blocks of {self.type_size} bytes")
        return n // self.type_size * self.block_size

    def bits_per_weight(self, k: int | None = None) -> float:
        if self.kind == "nf4_dq":
            k = k or 768
            return 8 * self.row_bytes(k) / k
        return 8 * self.type_size / self.block_size

    def fits(self, k: int) -> bool:
        return k > 0 and k % self.block_size == 0


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("q8_0", 32, 34, 8, "legacy", True, 8, "8-bit, fp16 scale per 32 (ggml Q8_0)"),
    Format("q5_1", 32, 24, 5, "legacy", False, 7, "5-bit, fp16 scale and min per 32 (ggml Q5_1)"),
    Format("q5_0", 32, 22, 5, "legacy", True, 6, "5-bit, fp16 scale per 32 (ggml Q5_0)"),
    Format("q4_1", 32, 20, 4, "legacy", False, 3, "4-bit, fp16 scale and min per 32 (ggml Q4_1)"),
    Format("q4_0", 32, 18, 4, "legacy", True, 2, "4-bit, fp16 scale per 32 (ggml Q4_0)"),
    Format("q5_k", 256, 176, 5, "kquant", False, 13,
           "5-bit k-quant: 6-bit scales and mins per 32, least-squares search (ggml Q5_K)"),
    Format("q4_k", 256, 144, 4, "kquant", False, 12,
           "4-bit k-quant: 6-bit scales and mins per 32, least-squares search (ggml Q4_K)"),
    Format("nf4", 64, 36, 4, "nf4", True, None, "4-bit NormalFloat, fp32 absmax per 64 (QLoRA)"),
    Format("nf4_dq", 64, 33, 4, "nf4_dq", True, None,
           "4-bit NormalFloat, absmax per 64 double-quantized to 8 bits per 256 (QLoRA)"),
)}
assert tuple(FORMATS) == TYPES, "quant.catalog.TYPES lists FORMATS, in order"
SYMMETRIC_OFFSET = {"q8_0": 128, "q4_0": 8, "q5_0": 16}  # codes are stored as q + c


def get_format(name: str | Format) -> Format:
    """A format by name (case-insensitive); the error lists the valid ones."""
    if isinstance(name, Format):
        return name
    return FORMATS[type_name(name)]


# --- public API ----------------------------------------------------------------------------


def quantize(weight: torch.Tensor, fmt: str | Format, name: str = "tensor",
             importance: torch.Tensor | None = None) -> torch.Tensor:
    """Pack `weight` (..., K) into uint8 (..., row_bytes(K)).

    `importance` (K,), optional: how much each input column matters (mean
    squared activation); it weights the scale search of the affine types.
    Non-finite weights, a K that is not a multiple of the block size and
    scales beyond fp16's range are refused with the tensor's name.
    """
    fmt = get_format(fmt)
    w = weight.detach()
    if w.dim() == 0 or not fmt.fits(w.shape[-1]):
        raise QuantError(f"tensor {name} has shape {list(w.shape)}: its last dimension must be a multiple of "
                         f"{fmt.name}'s block size {fmt.block_size}")
    k = w.shape[-1]
    rows = w.reshape(-1, k)
    if importance is not None:
        importance = importance.detach().float().to(w.device).reshape(-1)
        if importance.numel() != k or not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise QuantError(f"importance for tensor {name} must be {k} finite non-negative values")
    out = torch.empty(rows.shape[0], fmt.row_bytes(k), dtype=torch.uint8, device=w.device)
    searching = fmt.kind == "kquant" or (importance is not None and fmt.affine)
    step = max(1, (CHUNK // 16 if searching else CHUNK) // k)  # a search holds ~40 candidates per weight
    for r in range(0, rows.shape[0], step):
        chunk = rows[r:r + step].float()
        if not bool(torch.isfinite(chunk).all()):
            bad = (~torch.isfinite(chunk)).nonzero()[0]
            raise QuantError(f"tensor {name} has a non-finite weight ({chunk[bad[0], bad[1]].item()} at row "
                             f"{r + int(bad[0])}, column {int(bad[1])}); fix the model before quantizing it")
        if fmt.kind == "nf4":
            out[r:r + step] = quantize_nf4(chunk)
        elif fmt.kind == "nf4_dq":
            out[r:r + step] = quantize_nf4_dq(chunk)
        else:
            q, header = _quantize_affine(fmt, chunk, importance)
            out[r:r + step] = pack_codes(q, header, fmt)
        _check_scales(fmt, out[r:r + step], name)
    return out.reshape(*w.shape[:-1], out.shape[-1])


def dequantize(packed: torch.Tensor, fmt: str | Format, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack uint8 (..., row_bytes) into floats (..., K)."""
    fmt = get_format(fmt)
    nbytes = packed.shape[-1]
    k = fmt.k_from_row_bytes(nbytes)
    rows = packed.reshape(-1, nbytes)
    out = torch.empty(rows.shape[0], k, dtype=dtype, device=packed.device)
    step = max(1, CHUNK // max(k, 1))
    for r in range(0, rows.shape[0], step):
        chunk = rows[r:r + step]
        if fmt.kind == "nf4":
            x = dequantize_nf4(chunk)
        elif fmt.kind == "nf4_dq":
            x = dequantize_nf4_dq(chunk, k)
        else:
            q, header = codes(chunk, fmt)
            s, z = group_affine(header, fmt)
            x = (q.view(q.shape[0], -1, GROUP).float() * s[..., None] + z[..., None]).view(q.shape[0], k)
        out[r:r + step] = x
    return out.reshape(*packed.shape[:-1], k)


def _check_scales(fmt: Format, packed: torch.Tensor, name: str) -> None:
    """fp16 scales overflow for weights beyond ~65504 * 8: refuse rather than store inf."""
    if fmt.kind in ("nf4", "nf4_dq"):
        return
    blocks = packed.reshape(-1, fmt.type_size)
    scales = blocks[:, :fmt.header_size if fmt.kind == "legacy" else 4].contiguous().view(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise QuantError(f"tensor {name} has weights too large for {fmt.name}'s fp16 scales; "
                         f"keep it in full precision or rescale the model")


# --- the affine view: codes, headers, scales and offsets ------------------------------------------


def codes(packed: torch.Tensor, fmt: str | Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed rows (R, row_bytes) into codes (R, K) uint8 in [0, 2^bits) and headers (R, nblocks, header_size)."""
    fmt = get_format(fmt)
    R = packed.shape[0]
    blocks = packed.reshape(R, -1, fmt.type_size)
    nb = blocks.shape[1]
    header = blocks[..., :fmt.header_size]
    body = blocks[..., fmt.header_size:]
    if fmt.kind == "legacy":
        if fmt.bits == 8:
            q = body ^ 0x80  # int8 -> q + 128
        else:
            qs = body[..., -16:]
            q = torch.cat([qs & 15, qs >> 4], dim=-1)  # (R, nb, 32)
            if fmt.bits == 5:
                qh = body[..., :4]
                q = q | (_unpack_bits(qh) << 4)
    else:  # kquant: qs in 4 chunks of 32 bytes, chunk c = sub-blocks 2c (low) and 2c + 1 (high)
        qs = body[..., -128:].reshape(R, nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(R, nb, 256)
        if fmt.bits == 5:
            qh = body[..., :32].reshape(R, nb, 1, 32)
            bits = (qh >> torch.arange(8, dtype=torch.uint8, device=packed.device).view(1, 1, 8, 1)) & 1
            q = q | (bits.reshape(R, nb, 256) << 4)
    return q.reshape(R, -1), header


def pack_codes(q: torch.Tensor, header: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """The inverse of `codes`: codes (R, K) and headers (R, nblocks, header_size) -> packed rows."""
    fmt = get_format(fmt)
    R, K = q.shape
    nb = K // fmt.block_size
    q = q.reshape(R, nb, fmt.block_size)
    if fmt.kind == "legacy":
        if fmt.bits == 8:
            body = [q ^ 0x80]
        else:
            lo = q & 15
            body = [lo[..., :16] | (lo[..., 16:] << 4)]
            if fmt.bits == 5:
                body.insert(0, _pack_bits(q >> 4))
    else:
        lo = (q & 15).reshape(R, nb, 4, 2, 32)
        body = [(lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(R, nb, 128)]
        if fmt.bits == 5:
            hi = ((q >> 4) & 1).reshape(R, nb, 8, 32)
            shifts = torch.arange(8, dtype=torch.uint8, device=q.device).view(1, 1, 8, 1)
            body.insert(0, (hi << shifts).sum(dim=2, dtype=torch.uint8))
    return torch.cat([header, *body], dim=-1).reshape(R, nb * fmt.type_size)


def group_affine(header: torch.Tensor, fmt: str | Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and offset z (R, K / 32) float32 of every group of 32 weights: x = s q + z."""
    fmt = get_format(fmt)
    R = header.shape[0]
    d = _f16(header[..., 0:2])  # (R, nb)
    if fmt.kind == "legacy":
        if fmt.symmetric:
            return d, d * -float(SYMMETRIC_OFFSET[fmt.name])
        return d, _f16(header[..., 2:4])
    dmin = _f16(header[..., 2:4])
    sc, mn = unpack_scale_min(header[..., 4:16])  # (R, nb, 8)
    s = d[..., None] * sc.float()
    z = -(dmin[..., None] * mn.float())
    return s.reshape(R, -1), z.reshape(R, -1)


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    return two_bytes.contiguous().view(torch.float16).squeeze(-1).float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().unsqueeze(-1).view(torch.uint8)


def _unpack_bits(qh: torch.Tensor) -> torch.Tensor:  # (..., 4) bytes -> (..., 32) bits, little endian
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[..., None] >> shifts) & 1).reshape(*qh.shape[:-1], 32)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:  # (..., 32) of 0/1 -> (..., 4) bytes
    b = (bits & 1).reshape(*bits.shape[:-1], 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (b << shifts).sum(dim=-1, dtype=torch.uint8)


# --- rounding as llama.cpp rounds ---------------------------------------------------------------


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), exactly as gguf.quants.np_roundf."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


# --- quantization of the affine types ---------------------------------------------------------------


def _quantize_affine(fmt: Format, w: torch.Tensor, importance: torch.Tensor | None):
    """w (R, K) float32 -> codes (R, K) uint8, headers (R, nblocks, header_size) uint8."""
    R, K = w.shape
    if fmt.kind == "kquant":
        return quantize_kquant(fmt.bits, w, importance)
    x = w.reshape(R, K // 32, 32)
    if importance is not None:
        weights = _importance_weights(w, importance).reshape(R, K // 32, 32)
        if fmt.symmetric:
            d = _search_symmetric(x, weights, SYMMETRIC_OFFSET[fmt.name] if fmt.bits < 8 else 127, fmt)
        else:
            d, m, _ = search_scale_min(x, weights, 2 ** fmt.bits - 1, -0.9, 0.05, 36, clamp_min=False)
            m = -m
    else:
        d, m = _rtn_params(fmt, x)
    if fmt.symmetric:
        header = _f16_bytes(d)
        if importance is not None:  # round-to-nearest codes use the float32 scale, as ggml's reference
            d = d.half().float()  # does; after a search the codes follow the stored fp16 scale
        q = _symmetric_codes(fmt, x, d)
    else:
        header = torch.cat([_f16_bytes(d), _f16_bytes(m)], dim=-1)
        if importance is not None:
            d, m = d.half().float(), m.half().float()
        q = (torch.trunc((x - m[..., None]) * _inv(d)[..., None] + 0.5)).clamp(0, 2 ** fmt.bits - 1)
    return q.to(torch.uint8).reshape(R, K), header


def _rtn_params(fmt: Format, x: torch.Tensor):
    """ggml's reference (round-to-nearest) scale, and min for the asymmetric types, per block of 32."""
    if fmt.name == "q8_0":
        return x.abs().amax(dim=-1) / 127, None
    if fmt.symmetric:  # the signed value of largest magnitude, mapped to -8 (-16)
        imax = x.abs().argmax(dim=-1, keepdim=True)
        return x.gather(-1, imax).squeeze(-1) / -float(SYMMETRIC_OFFSET[fmt.name]), None
    mx, mn = x.amax(dim=-1), x.amin(dim=-1)
    return (mx - mn) / float(2 ** fmt.bits - 1), mn


def _symmetric_codes(fmt: Format, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    idd = _inv(d)[..., None]
    if fmt.name == "q8_0":
        return _roundf(x * idd).clamp(-128, 127) + 128
    c = SYMMETRIC_OFFSET[fmt.name]
    return torch.trunc(x * idd + (c + 0.5)).clamp(0, 2 * c - 1)


def _importance_weights(w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """llama.cpp's imatrix weighting: qw[j] * sqrt(sigma2 + x[j]^2), sigma2 = mean x^2 of the row."""
    sigma2 = (w * w).mean(dim=-1, keepdim=True)
    return importance[None, :] * torch.sqrt(sigma2 + w * w)


def _search_symmetric(x, weights, nmax: int, fmt: Format):
    """llama.cpp's make_qx_quants (rmse_type 1), vectorised: try 19 scales around -nmax / max, refit
    each candidate's codes by weighted least squares, keep the best (the first of equals)."""
    imax = x.abs().argmax(dim=-1, keepdim=True)
    mx = x.gather(-1, imax)  # (..., 1)
    steps = torch.arange(-9, 10, device=x.device, dtype=x.dtype) * 0.1
    if fmt.name == "q8_0":
        lo, hi = -128, 127
        iscale = _inv(mx.abs()) * (127 + steps)  # (..., S)
    else:
        lo, hi = -nmax, nmax - 1
        iscale = torch.where(mx == 0, torch.zeros_like(mx), -(nmax + steps) / torch.where(mx == 0, 1.0, mx))
    L = torch.round(iscale[..., None] * x.unsqueeze(-2)).clamp_(lo, hi)  # (..., S, n)
    wL = weights.unsqueeze(-2) * L
    sumlx = (wL * x.unsqueeze(-2)).sum(-1)
    suml2 = (wL * L).sum(-1)
    ok = suml2 > 0
    scale = torch.where(ok, sumlx / torch.where(ok, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    score = torch.where(ok, scale * sumlx, torch.full_like(scale, -1.0))
    best = score.argmax(dim=-1, keepdim=True)  # the first of equals
    return torch.where(ok.gather(-1, best), scale.gather(-1, best), torch.zeros_like(mx)).squeeze(-1)


