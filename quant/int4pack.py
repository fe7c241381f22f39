"""torch's packed int4 CPU kernel: its layout, and weights in the form it multiplies.

`_weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)` computes
x @ W.T with W = s (p - 8) + z per group of 32 weights along the input
dimension, p in [0, 16), x, s and z in bfloat16 (float32 and float16 work too,
but several times slower). The packed layout of
`_convert_weight_to_int4pack_for_cpu` depends on the CPU's vector width, so
lbdl probes it once (`int4_layout`) and reads codes back from it only when it
recognises it; otherwise quantized modules keep their block bytes and
dequantize instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import GROUP, Format, codes, group_affine, pack_codes

ROW_CHUNK = 512  # rows converted per step (a multiple of every kernel block of rows): small temporaries


# --- torch's packed int4 CPU kernel -------------------------------------------------------------------

_LAYOUT: tuple | None | bool = False  # False: not probed yet; None: unusable; else (rows per block, halves)


def _int4_ops() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def _pack_int4(plane: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in [0, 16), N a multiple of 16 -> the kernel's packed layout, a few rows at a time."""
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane[r:r + ROW_CHUNK].to(torch.int32).contiguous(), 1)
             for r in range(0, plane.shape[0], ROW_CHUNK)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _nibbles(packed: torch.Tensor, rows: torch.Tensor, N: int, K: int, layout) -> torch.Tensor:
    """Codes (len(rows), K) of the given rows, read from the kernel's packed layout.

    The layout (torch's weight_to_int4pack_kernel): rows in blocks of BN, each
    block stored as K rows of BN / 2 bytes; a full block pairs row j with row
    j + BN/2 in one byte ("halves"), a partial block pairs rows 2i and 2i + 1.
    """
    BN, halves = layout
    block = rows // BN
    within = rows % BN
    size = torch.clamp(N - block * BN, max=BN)
    full = (size == BN) & halves
    byte = torch.where(full, within % (BN // 2), within // 2)
    shift = torch.where(full, 4 * (within // (BN // 2)), 4 * (within % 2)).to(torch.uint8)
    k = torch.arange(K, device=rows.device)
    flat = (block * BN * K // 2)[:, None] + k[None, :] * (size // 2)[:, None] + byte[:, None]
    return (packed.reshape(-1)[flat] >> shift[:, None]) & 15


def int4_layout():
    """The CPU kernel's packed layout, found by probing; None when the kernel is missing or unrecognised."""
    global _LAYOUT
    if _LAYOUT is not False:
        return _LAYOUT
    _LAYOUT = None
    if not _int4_ops():
        return None
    try:
        g = torch.Generator().manual_seed(0)
        N, K = 112, 64
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        packed = _pack_int4(q)
        rows = torch.arange(N)
        for layout in ((64, True), (32, True), (16, True), (64, False), (32, False), (16, False)):
            if torch.equal(_nibbles(packed, rows, N, K, layout), q.to(torch.uint8)):
                sz = torch.stack([torch.full((K // 32, N), 0.5), torch.full((K // 32, N), 1.0)], -1)
                x = torch.randn(3, K, generator=g)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz.bfloat16())
                ref = x.bfloat16().float() @ ((q.float() - 8) * 0.5 + 1.0).T
                if torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-1):
                    _LAYOUT = layout
                break
    except RuntimeError:
        _LAYOUT = None
    return _LAYOUT


class Int4Planes:
    """One or two packed 4-bit planes sharing one bf16 (scale, zero) pair per group: the kernel's form of a weight.

    4-bit codes: one plane p = q, with x = s (p - 8) + (z + 8 s). Wider codes q = 16 h + l: plane L
    holds l, plane H holds h + o (o = 8 for 5 bits, 0 for 8), and both use the same (s, z0) with
    17 z0 = z + 8 s - 16 (o - 8) s; the H plane multiplies 16 x, so
    kernel(16 x, H) + kernel(x, L) = x . (s (16 h + l) + z) = x . (s q + z).
    For Q8_0 (z = -128 s) z0 = 8 s / 17, for Q5_0 -8 s / 17: their bf16 rounding moves a weight by
    at most s / 64. Built a few hundred rows at a time, so that converting a large matrix (a
    50k-token head) needs only small temporaries.
    """

    def __init__(self, fmt: Format, blocks: torch.Tensor, N: int, K: int):
        self.fmt, self.N, self.K = fmt, N, K
        self.n_pad = (-N) % 16
        Np = N + self.n_pad
        self.hi_offset = 8 if fmt.bits == 5 else 0
        n_planes = 1 if fmt.bits == 4 else 2
        self.header = torch.empty(N, K // fmt.block_size, fmt.header_size, dtype=torch.uint8)
        self.planes = [torch.empty(Np, K // 2, dtype=torch.uint8) for _ in range(n_planes)]
        self.sz = torch.empty(K // GROUP, Np, 2, dtype=torch.bfloat16)
        for r in range(0, Np, ROW_CHUNK):
            rows = min(ROW_CHUNK, Np - r)
            q, header = codes(blocks[r:r + rows], fmt)  # (n, K) uint8, (n, nb, h); n < rows in the padding
            self.header[r:r + rows] = header
            s, z = group_affine(header, fmt)  # (n, K/32) float32
            if q.shape[0] < rows:  # rows past N: zero codes with zero scales contribute nothing
                pad = rows - q.shape[0]
                q, s, z = F.pad(q, (0, 0, 0, pad)), F.pad(s, (0, 0, 0, pad)), F.pad(z, (0, 0, 0, pad))
            if n_planes == 1:
                planes, zero = [q], z + 8 * s
            else:
                planes, zero = [q & 15, (q >> 4) + self.hi_offset], (z + 8 * s - 16 * (self.hi_offset - 8) * s) / 17
            for i, plane in enumerate(planes):
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane.to(torch.int32).contiguous(), 1)
                self.planes[i].view(-1)[r * K // 2:(r + rows) * K // 2] = packed.reshape(-1)
            self.sz[:, r:r + rows] = torch.stack([s.T, zero.T], dim=-1)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:  # x2 (M, K) bf16 -> (M, N) float32
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2, self.planes[0], GROUP, self.sz).float()
        if len(self.planes) > 1:
            y += mm(x2 * 16, self.planes[1], GROUP, self.sz).float()
        return y[:, :self.N] if self.n_pad else y

    def codes(self, rows: torch.Tensor) -> torch.Tensor:
        layout, Np = int4_layout(), self.N + self.n_pad
        q = _nibbles(self.planes[0], rows, Np, self.K, layout)
        if len(self.planes) > 1:
            q = q | ((_nibbles(self.planes[1], rows, Np, self.K, layout) - self.hi_offset) << 4)
        return q

    def rows(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        """Dequantized rows (len(rows), K) in float32, exactly as the stored blocks give them."""
        q = self.codes(rows)
        s, z = group_affine(self.header[rows], self.fmt)
        return (q.view(len(rows), -1, GROUP).float() * s[..., None] + z[..., None]).view(len(rows), self.K).to(dtype)

    def blocks(self) -> torch.Tensor:
        parts = []
        for r in range(0, self.N, ROW_CHUNK):
            rows = torch.arange(r, min(r + ROW_CHUNK, self.N))
            parts.append(pack_codes(self.codes(rows), self.header[r:r + ROW_CHUNK], self.fmt))
        return torch.cat(parts)

    def tensors(self) -> list[torch.Tensor]:
        return [self.header, *self.planes, self.sz]
