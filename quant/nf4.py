"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), with optional double quantization.

16 levels at the quantiles of a normal distribution, with an exact zero; each
block of 64 weights is scaled by its absolute maximum. Row layout (lbdl's own:
NF4 is not a ggml type): per block an fp32 absmax then 32 bytes of codes (byte
j: element j in the low nibble, element j + 32 in the high one), 4.5 bits per
weight. Double quantization (`nf4_dq`) stores a row's absmaxes as one byte
each (bitsandbytes' signed dynamic 8-bit map applied to absmax - mean, in
groups of 256), after the row's codes, then one fp32 scale per group and the
row's fp32 mean: about 4.13 bits per weight.
"""

from __future__ import annotations

import math

import torch

DQ_GROUP = 256  # absmaxes per double-quantization group

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def row_bytes_dq(nb: int) -> int:
    """Bytes of an nf4_dq row of nb blocks: codes, absmax codes, group scales, mean."""
    return nb * 32 + nb + 4 * math.ceil(nb / DQ_GROUP) + 4


def _nf4_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., 64) -> codes (..., 64) uint8 and absmax (...,) float32: nearest NF4 level of x / absmax."""
    absmax = x.abs().amax(dim=-1)
    n = x * _inv(absmax)[..., None]
    levels = NF4_LEVELS.to(x.device)
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(n, mids).to(torch.uint8), absmax


def _nf4_pack(c: torch.Tensor) -> torch.Tensor:  # (..., 64) codes -> (..., 32) bytes
    return c[..., :32] | (c[..., 32:] << 4)


def _nf4_unpack(b: torch.Tensor) -> torch.Tensor:  # (..., 32) bytes -> (..., 64) codes
    return torch.cat([b & 15, b >> 4], dim=-1)


def quantize_nf4(w: torch.Tensor) -> torch.Tensor:
    R, K = w.shape
    c, absmax = _nf4_codes(w.reshape(R, K // 64, 64))
    header = absmax.unsqueeze(-1).view(torch.uint8)  # fp32, 4 bytes
    return torch.cat([header, _nf4_pack(c)], dim=-1).reshape(R, -1)


def dequantize_nf4(p: torch.Tensor) -> torch.Tensor:
    R = p.shape[0]
    blocks = p.reshape(R, -1, 36)
    absmax = blocks[..., :4].contiguous().view(torch.float32)  # (R, nb, 1)
    c = _nf4_unpack(blocks[..., 4:]).long()
    return (NF4_LEVELS.to(p.device)[c] * absmax).reshape(R, -1)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): 256 sorted values in [-1, 1]."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC = dynamic_map()


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's double quantization of one row's absmaxes (R, nb): codes uint8 (R, nb), group scales (R, ng),
    mean (R,)."""
    R, nb = absmax.shape
    ng = math.ceil(nb / DQ_GROUP)
    mean = absmax.mean(dim=-1)
    c = absmax - mean[:, None]
    padded = torch.nn.functional.pad(c, (0, ng * DQ_GROUP - nb)).reshape(R, ng, DQ_GROUP)
    gscale = padded.abs().amax(dim=-1)  # (R, ng)
    n = padded * _inv(gscale)[..., None]
    table = _DYNAMIC.to(absmax.device)
    idx = torch.bucketize(n, (table[1:] + table[:-1]) / 2).to(torch.uint8)
    return idx.reshape(R, -1)[:, :nb], gscale, mean


def dequantize_absmax(idx: torch.Tensor, gscale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    R, nb = idx.shape
    ng = gscale.shape[1]
    table = _DYNAMIC.to(idx.device)
    padded = torch.nn.functional.pad(idx.long(), (0, ng * DQ_GROUP - nb)).reshape(R, ng, DQ_GROUP)
    vals = (table[padded] * gscale[..., None]).reshape(R, -1)[:, :nb]
    return (vals + mean[:, None]).clamp(min=0.0)


def quantize_nf4_dq(w: torch.Tensor) -> torch.Tensor:
    R, K = w.shape
    nb = K // 64
    x = w.reshape(R, nb, 64)
    absmax = x.abs().amax(dim=-1)
    idx, gscale, mean = quantize_absmax(absmax)
    stored = dequantize_absmax(idx, gscale, mean)  # codes are chosen against the scale that is stored
    c, _ = _nf4_codes(torch.where(stored[..., None] > 0, x / torch.where(stored > 0, stored, 1.0)[..., None],
                                  torch.zeros_like(x)).clamp(-1, 1))
    parts = [_nf4_pack(c).reshape(R, -1), idx, gscale.contiguous().view(torch.uint8),
             mean.unsqueeze(-1).contiguous().view(torch.uint8)]
    return torch.cat(parts, dim=-1)


def dequantize_nf4_dq(p: torch.Tensor, k: int) -> torch.Tensor:
    R = p.shape[0]
    nb = k // 64
    ng = math.ceil(nb / DQ_GROUP)
    o = nb * 32
    c = _nf4_unpack(p[:, :o].reshape(R, nb, 32)).long()
    idx = p[:, o:o + nb]
    gscale = p[:, o + nb:o + nb + 4 * ng].contiguous().view(torch.float32)
    mean = p[:, o + nb + 4 * ng:].contiguous().view(torch.float32).squeeze(-1)
    absmax = dequantize_absmax(idx, gscale, mean)
    return (NF4_LEVELS.to(p.device)[c] * absmax[..., None]).reshape(R, k)
