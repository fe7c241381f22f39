"""k-quant support: llama.cpp's least-squares scale search and the Q4_K / Q5_K super-blocks.

A super-block of 256 weights holds 8 sub-blocks of 32, each with a 6-bit
scale and a 6-bit min (packed in 12 bytes as ggml's get_scale_min_k4 reads
them), under an fp16 scale d and an fp16 dmin: x = d sc_j q - dmin m_j.
Each sub-block's scale and min come from make_qkx2_quants, a weighted
least-squares search over candidate scales; with an importance vector the
weights are llama.cpp's imatrix weighting.
"""

from __future__ import annotations

import torch

QK_K = 256  # weights per k-quant super-block


def unpack_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc, mn


def pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_scale_min for 6-bit values (..., 8) -> (..., 12) bytes."""
    lo_d = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    lo_m = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    md = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([lo_d, lo_m, md], dim=-1)



def search_scale_min(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int, clamp_min: bool = True):
    """llama.cpp's make_qkx2_quants, vectorised over blocks and candidates: x, weights (..., n).

    Try the scale nmax / (max - min) and nstep + 1 others around it, refit scale and min of each
    candidate's codes by weighted least squares, keep the one with the smallest weighted squared
    error (the first of equals, as the C loop does). All candidates are evaluated at once, and a
    candidate's error comes from per-block sums (sum w (s l + m - x)^2 expanded).
    Returns (scale, the_min, L) with x ~ scale * L - the_min.
    """
    mn = x.amin(dim=-1)
    mx = x.amax(dim=-1)
    if clamp_min:
        mn = torch.clamp(mn, max=0.0)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    sum_x2 = (weights * x * x).sum(-1, keepdim=True)
    rng = mx - mn
    flat = rng == 0
    safe = torch.where(flat, torch.ones_like(rng), rng)
    xm = (x - mn[..., None]).unsqueeze(-2)  # (..., 1, n)
    # candidate 0: nmax / range with min as is; candidates 1..: refit by least squares
    steps = torch.tensor([0.0] + [rmin + rdelta * i for i in range(nstep + 1)], device=x.device)
    iscale = (steps + nmax) / safe[..., None]  # (..., S)
    La = torch.round(iscale[..., None] * xm).clamp_(0, nmax)  # (..., S, n)
    wL = weights.unsqueeze(-2) * La
    sum_l = wL.sum(-1)
    sum_l2 = (wL * La).sum(-1)
    sum_xl = (wL * x.unsqueeze(-2)).sum(-1)
    del wL
    D = sum_w * sum_l2 - sum_l * sum_l
    Ds = torch.where(D > 0, D, torch.ones_like(D))
    scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
    the_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
    if clamp_min:
        pos = the_min > 0
        the_min = torch.where(pos, torch.zeros_like(the_min), the_min)
        scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), scale)
    ok = D > 0
    scale[..., 0], the_min[..., 0], ok[..., 0] = 1 / iscale[..., 0], mn, True  # the first guess, not refitted
    err = (scale * scale * sum_l2 + 2 * scale * the_min * sum_l - 2 * scale * sum_xl
           + the_min * the_min * sum_w - 2 * the_min * sum_x + sum_x2)
    err = torch.where(ok, err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=-1, keepdim=True)  # the first of equal errors
    L = La.gather(-2, best[..., None].expand(*best.shape, La.shape[-1])).squeeze(-2)
    scale = scale.gather(-1, best).squeeze(-1)
    the_min = the_min.gather(-1, best).squeeze(-1)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[..., None], torch.zeros_like(L), L)
    return scale, -the_min, L


def quantize_kquant(bits: int, w: torch.Tensor, importance: torch.Tensor | None):
    """llama.cpp's quantize_row_q4_K / q5_K: search each sub-block, quantize its scale and min to 6 bits."""
    R, K = w.shape
    nmax = 2 ** bits - 1
    x = w.reshape(R, K // QK_K, 8, 32)
    if importance is not None:
        sigma2 = 2 * (w * w).reshape(R, K // QK_K, 1, QK_K).mean(-1, keepdim=True)
        weights = importance.reshape(1, K // QK_K, 8, 32) * torch.sqrt(sigma2 + x * x)
    else:
        av_x = torch.sqrt((x * x).mean(-1, keepdim=True))
        weights = av_x + x.abs()
    if bits == 4:
        scales, mins, L = search_scale_min(x, weights, nmax, -1.0, 0.1, 20)
    else:
        scales, mins, L = search_scale_min(x, weights, nmax, -0.5, 0.1, 15)
    max_scale = scales.amax(dim=-1)
    max_min = mins.amax(dim=-1)
    inv_scale = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                            torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                          torch.zeros_like(max_min))
    ls = torch.round(inv_scale[..., None] * scales).clamp(0, 63)
    lm = torch.round(inv_min[..., None] * mins).clamp(0, 63)
    d = (max_scale / 63).half()
    dmin = (max_min / 63).half()
    dj = d.float()[..., None] * ls  # (R, nsb, 8)
    dmj = dmin.float()[..., None] * lm
    Lq = torch.round((x + dmj[..., None]) / torch.where(dj == 0, torch.ones_like(dj), dj)[..., None]).clamp(0, nmax)
    L = torch.where((dj == 0)[..., None], L, Lq)  # as ggml: a zero scale keeps the searched codes
    header = torch.cat([d.unsqueeze(-1).view(torch.uint8), dmin.unsqueeze(-1).view(torch.uint8),
                        pack_scale_min(ls.to(torch.uint8), lm.to(torch.uint8))], dim=-1)
    return L.to(torch.uint8).reshape(R, K), header
