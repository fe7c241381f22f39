"""quant/formats.py: bit-identical ggml blocks (gguf.quants as the oracle), error bounds, NF4, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quant.formats import FORMATS, QuantError, codes, dequantize, get_format, group_affine, pack_codes, quantize
from quant.nf4 import NF4_LEVELS, dequantize_absmax, quantize_absmax

LEGACY = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
KQUANTS = ("q4_k", "q5_k")


def adversarial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    outlier = torch.randn(4, 64, generator=g) * 0.01
    outlier[0, 3], outlier[1, 40], outlier[3, 63] = 50.0, -70.0, 1e-3
    ties = torch.tensor([[1.0, -1.0] * 16 + [0.5] * 32, [-1.0, 1.0] * 16 + [-0.25] * 32])
    return {
        "random": torch.randn(64, 256, generator=g),
        "zero blocks": torch.zeros(4, 64),
        "constant": torch.full((4, 64), 0.37),
        "negative constant": torch.full((4, 64), -2.5),
        "negative only": -torch.rand(8, 64, generator=g),
        "single outlier": outlier,
        "very small": torch.randn(8, 64, generator=g) * 1e-6,
        "very large": torch.randn(8, 64, generator=g) * 1e4,
        "sign ties": ties,
        "exact halves": (torch.randint(-20, 20, (16, 64), generator=g).float() + 0.5) / 8,
        "mixed zero block": torch.cat([torch.zeros(2, 32), torch.randn(2, 32, generator=g)], dim=1),
    }


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("case", list(adversarial()))
def test_bit_identical_to_gguf(name, case):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    w = adversarial()[case]
    qtype = getattr(GGMLQuantizationType, name.upper())
    ref = gq.quantize(w.numpy(), qtype)
    mine = quantize(w, name)
    assert mine.dtype == torch.uint8 and tuple(mine.shape) == ref.shape
    assert np.array_equal(mine.numpy(), ref), f"{name} on {case}: {(mine.numpy() != ref).sum()} bytes differ"
    assert np.array_equal(dequantize(mine, name).numpy(), gq.dequantize(ref, qtype))


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_blocks_read_by_gguf(name):
    """gguf has no k-quant quantizer, but its dequantizer reads lbdl's bytes to the same floats."""
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    for case, w in adversarial().items():
        w = w.repeat(1, 4) if w.shape[-1] % 256 else w
        packed = quantize(w, name)
        ref = gq.dequantize(packed.numpy(), getattr(GGMLQuantizationType, name.upper()))
        assert np.array_equal(dequantize(packed, name).numpy(), ref), case


def test_block_sizes_and_bits():
    expected = {"q8_0": (34, 8.5), "q4_0": (18, 4.5), "q4_1": (20, 5.0), "q5_0": (22, 5.5), "q5_1": (24, 6.0),
                "q4_k": (144, 4.5), "q5_k": (176, 5.5), "nf4": (36, 4.5)}
    for name, (size, bits) in expected.items():
        fmt = get_format(name)
        assert fmt.type_size == size and fmt.bits_per_weight() == bits
        assert quantize(torch.randn(3, 512), name).shape == (3, 512 // fmt.block_size * size)
    assert get_format("nf4_dq").bits_per_weight(4096) < 4.2  # 8-bit absmax per 64 + a little per row


def test_known_answer_q4_0():
    w = torch.arange(32, dtype=torch.float32) - 16  # -16 .. 15: the largest magnitude is -16
    packed = quantize(w[None], "q4_0")[0]
    d = torch.tensor([packed[0], packed[1]], dtype=torch.uint8).view(torch.float16).item()
    assert d == 2.0  # -16 / -8
    q = torch.cat([packed[2:] & 15, packed[2:] >> 4]).long()
    assert torch.equal(q, torch.clamp(torch.trunc(w / 2 + 8.5), 0, 15).long())
    assert torch.equal(dequantize(packed[None], "q4_0")[0], 2.0 * (q - 8).float())


@pytest.mark.parametrize("name,bound", [("q8_0", 0.01), ("q5_1", 0.04), ("q5_0", 0.05), ("q4_1", 0.09),
                                        ("q4_0", 0.1), ("q5_k", 0.04), ("q4_k", 0.08), ("nf4", 0.1),
                                        ("nf4_dq", 0.1)])
def test_round_trip_error_bounds(name, bound):
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    x = dequantize(quantize(w, name), name)
    rel_rms = ((x - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rel_rms < bound, f"{name}: {rel_rms:.4f}"


def test_blockwise_error_bounds():
    """Round to nearest: at most half a step, plus what rounding the scale (and min) to fp16 moves the weights."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    blocks = w.view(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    for name, steps in (("q8_0", 254), ("q4_1", 15), ("q5_1", 31), ("q4_0", 15), ("q5_0", 31)):
        err = (dequantize(quantize(w, name), name) - w).view(-1, 32).abs()
        spread = blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)
        step = 2 * amax / steps if name in ("q8_0",) else spread / steps
        half = 0.5
        if name in ("q4_0", "q5_0"):  # the extreme maps to -8 (-16), so the other side clips at +7 (+15):
            step, half = amax / (steps + 1) * 2, 1.0  # steps of amax / 8, up to a whole step at the top
        assert bool((err <= half * step + 2 ** -10 * amax).all()), name
        assert err.max() > 0.3 * step.max()  # and not trivially: real rounding happened


def test_error_minimising_kquants_beat_round_to_nearest_at_the_same_size():
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 3, 1024)
    mse = {n: (dequantize(quantize(w, n), n) - w).pow(2).mean().item() for n in ("q4_0", "q4_k", "q5_0", "q5_k")}
    assert mse["q4_k"] < 0.9 * mse["q4_0"]  # both 4.5 bits per weight
    assert mse["q5_k"] < 0.9 * mse["q5_0"]  # both 5.5 bits per weight


@pytest.mark.parametrize("name", ("q4_0", "q4_1", "q5_0", "q4_k", "q8_0"))
def test_importance_lowers_the_weighted_error(name):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 512, generator=g)
    imp = torch.rand(512, generator=g) ** 4 * 100  # a few columns matter a lot
    plain = dequantize(quantize(w, name), name)
    weighted = dequantize(quantize(w, name, importance=imp), name)
    werr = lambda x: ((x - w).pow(2) * imp).sum().item()  # noqa: E731
    assert werr(weighted) < werr(plain)


@pytest.mark.parametrize("name", [n for n in FORMATS if FORMATS[n].affine])
def test_codes_and_affine_view_reproduce_the_bytes(name):
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(5))
    packed = quantize(w, name)
    q, header = codes(packed, name)
    assert int(q.max()) < 2 ** FORMATS[name].bits
    assert torch.equal(pack_codes(q, header, name), packed)
    s, z = group_affine(header, name)
    x = q.view(8, -1, 32).float() * s[..., None] + z[..., None]
    assert torch.equal(x.view(8, 512), dequantize(packed, name))


def test_nf4_values_are_exact():
    for absmax in (1.0, 0.37, 12.5):
        w = (NF4_LEVELS * absmax).repeat(4).view(1, 64)
        packed = quantize(w, "nf4")
        assert torch.equal(dequantize(packed, "nf4"), NF4_LEVELS.repeat(4).view(1, 64) * np.float32(absmax))
        q = torch.cat([packed[0, 4:] & 15, packed[0, 4:] >> 4]).long()
        assert torch.equal(q, torch.arange(16).repeat(4))  # the 16 levels in order: code i is level i
    assert NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[15] == 1 and len(NF4_LEVELS) == 16
    w = torch.tensor([[1.0] + [0.5, -0.05] * 31 + [0.0]])  # absmax 1: 0.5 -> level 12, -0.05 -> level 6
    expected = torch.tensor([[1.0] + [0.44070982933044434, -0.09105003625154495] * 31 + [0.0]])
    assert torch.equal(dequantize(quantize(w, "nf4"), "nf4"), expected)


def test_double_quantization_round_trip():
    g = torch.Generator().manual_seed(6)
    absmax = torch.rand(3, 700, generator=g) * 2 + 0.01  # 700 blocks: three groups, the last partial
    idx, gscale, mean = quantize_absmax(absmax)
    assert idx.dtype == torch.uint8 and gscale.shape == (3, 3) and mean.shape == (3,)
    back = dequantize_absmax(idx, gscale, mean)
    per_block_gscale = gscale.repeat_interleave(256, dim=1)[:, :700]
    assert bool(((back - absmax).abs() <= 0.008 * per_block_gscale).all())  # 8-bit dynamic codes of absmax - mean
    real = torch.randn(2, 700 * 64, generator=g).view(2, 700, 64).abs().amax(-1)  # absmaxes of Gaussian blocks
    back = dequantize_absmax(*quantize_absmax(real))
    assert ((back - real).abs() / real).max() < 0.01
    w = torch.randn(16, 4096, generator=g) * torch.rand(16, 1, generator=g)
    plain, dq = dequantize(quantize(w, "nf4"), "nf4"), dequantize(quantize(w, "nf4_dq"), "nf4_dq")
    assert (dq - w).pow(2).mean() < 1.05 * (plain - w).pow(2).mean()  # the scales' 8 bits cost almost nothing
    assert quantize(w, "nf4_dq").numel() < 0.93 * quantize(w, "nf4").numel()


def test_non_finite_weights_are_refused_with_the_tensor_name():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    for name in ("q4_0", "nf4", "q4_k"):
        x = w.repeat(1, 4)
        with pytest.raises(QuantError, match=r"blocks\.1\.mlp\.up_proj\.weight has a non-finite weight.*row 2"):
            quantize(x, name, name="blocks.1.mlp.up_proj.weight")
    w[2, 5] = float("inf")
    with pytest.raises(QuantError, match="non-finite"):
        quantize(w, "q8_0", name="x")


def test_bad_shapes_types_and_scales_are_refused():
    with pytest.raises(QuantError, match="w has shape \\[4, 40\\].*multiple of q4_0's block size 32"):
        quantize(torch.randn(4, 40), "q4_0", name="w")
    with pytest.raises(QuantError, match="multiple of q4_k's block size 256"):
        quantize(torch.randn(4, 128), "q4_k")
    with pytest.raises(QuantError, match="unknown quantization type 'q3_k'; valid types: q8_0, .*nf4"):
        get_format("q3_k")
    with pytest.raises(QuantError, match="too large for q4_1's fp16 scales"):
        quantize(torch.tensor([[-1e6] + [1e6] * 31]), "q4_1", name="big")
    with pytest.raises(QuantError, match="importance"):
        quantize(torch.randn(2, 64), "q4_0", importance=torch.ones(32))


def test_rows_are_independent_and_leading_dims_kept():
    w = torch.randn(2, 3, 64)
    packed = quantize(w, "q4_1")
    assert packed.shape == (2, 3, 40)
    assert torch.equal(packed[1, 2], quantize(w[1, 2][None], "q4_1")[0])
    assert dequantize(packed, "q4_1").shape == (2, 3, 64)
