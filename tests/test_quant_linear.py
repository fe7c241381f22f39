"""quant/linear.py: QuantLinear == F.linear with the dequantized weight, packed storage only, model loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lbdl_cli.checkpoint import load_model, save_model
from quant.formats import FORMATS, dequantize, quantize
from quant.int4pack import int4_layout
from quant.linear import QuantEmbedding, QuantLinear, QuantModule, quant_modules, quantize_model, set_backend

from conftest import tiny_model

AFFINE = [n for n, f in FORMATS.items() if f.affine]
KERNEL = int4_layout() is not None


def linear(n_out=100, n_in=512, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def rel_err(y, ref) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n_out", [64, 100])  # 100: not a multiple of 16, so the kernel's rows are padded
def test_quant_linear_matches_f_linear_with_the_dequantized_weight(name, n_out):
    lin = linear(n_out)
    q = QuantLinear.from_linear(lin, name)
    W = dequantize(quantize(lin.weight, name), name)
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        y, ref = q(x), F.linear(x, W, lin.bias)
    assert y.shape == (2, 3, n_out) and y.dtype == torch.float32
    if q.kernel == "int4pack":  # bfloat16 activations, scales and outputs: bf16's 2^-8 relative precision
        assert rel_err(y, ref) < 1e-2
        ref_bf16 = F.linear(x.bfloat16().float(), W, lin.bias)
        assert torch.allclose(y, ref_bf16, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    else:
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not KERNEL, reason="torch's packed int4 CPU kernel is not available")
def test_cpu_kernel_selection():
    lin = linear()
    for name in FORMATS:
        q = QuantLinear.from_linear(lin, name)
        assert q.kernel == ("int4pack" if FORMATS[name].affine else "dequantize"), name
    q = QuantLinear.from_linear(lin, "q4_0")
    q.set_backend("blocks")
    assert q.kernel == "dequantize"
    x = torch.randn(4, 512)
    W = dequantize(quantize(lin.weight, "q4_0"), "q4_0")
    assert torch.allclose(q(x), F.linear(x, W, lin.bias), rtol=1e-5, atol=1e-5)  # exact path, float32


@pytest.mark.skipif(not KERNEL, reason="torch's packed int4 CPU kernel is not available")
@pytest.mark.parametrize("name", ["q8_0", "q5_0", "q5_1"])
def test_two_plane_formats_move_no_weight_by_more_than_a_64th_of_a_step(name):
    """q = 16 h + l on two int4 planes sharing (s, z0): with integer inputs and bf16-exact scales only the
    rounding of z0 to bf16 (at most s / 64 per weight) and the bf16 outputs separate it from x @ W.T."""
    torch.manual_seed(1)
    w = (torch.randint(-100, 100, (64, 256)).float() * 2 ** -7)
    lin = nn.Linear(256, 64, bias=False)
    lin.weight.data = w
    q = QuantLinear.from_linear(lin, name)
    W = q.dequantize()
    x = torch.randint(-3, 4, (5, 256)).float()  # small integers: x @ W.T is exact in float32
    ref = x @ W.T
    blocks = w.view(64, -1, 32)
    step = blocks.abs().amax(-1).max() / (127 if name == "q8_0" else 15)
    # z0's rounding, plus bf16 outputs of each plane (bounded by sum |x| |w|, as any dot product's rounding)
    bound = x.abs().sum(-1, keepdim=True) * step / 64 + (x.abs() @ W.abs().T) * 2 ** -7
    assert bool(((q(x) - ref).abs() <= bound).all())


@pytest.mark.parametrize("name", ["q4_1", "q8_0", "q5_k", "nf4"])
def test_packed_bytes_and_state_dict_round_trip_exactly(name):
    lin = linear()
    packed = quantize(lin.weight, name)
    q = QuantLinear.from_linear(lin, name)
    assert torch.equal(q.packed(), packed)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.uint8 and torch.equal(sd["weight"], packed)
    assert torch.equal(sd["bias"], lin.bias)
    assert torch.equal(q.dequantize(), dequantize(packed, name))
    fresh = QuantLinear(512, 100, name)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.packed(), packed) and fresh.kernel == q.kernel


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_k", "nf4"])
def test_embedding_rows_and_tied_head(name):
    torch.manual_seed(2)
    emb = nn.Embedding(100, 256)
    q = QuantEmbedding.from_embedding(emb, name)
    W = dequantize(quantize(emb.weight, name), name)
    idx = torch.tensor([[3, 99, 0], [50, 63, 64]])
    assert torch.equal(q(idx), W[idx])  # lookups are exact: rows are gathered, not multiplied
    assert torch.equal(F.embedding(idx, q.weight), W[idx])
    x = torch.randn(2, 256)
    head = F.linear(x, q.weight)  # how GPT computes a tied head
    tol = 1e-2 if q.kernel == "int4pack" else 1e-5
    assert rel_err(head, x @ W.T) < tol
    assert q.weight.shape == (100, 256) and q.weight.dtype == torch.float32 and q.weight.is_floating_point()
    with pytest.raises(TypeError, match="dequantize"):
        torch.matmul(x, q.weight)


def test_gradient_flows_to_the_input_for_qlora():
    lin = linear(n_out=64)
    W = dequantize(quantize(lin.weight, "q4_1"), "q4_1")
    for backend in ("auto", "blocks"):
        q = QuantLinear.from_linear(lin, "q4_1")
        q.set_backend(backend)
        x = torch.randn(3, 512, requires_grad=True)
        q(x).pow(2).sum().backward()
        x2 = x.detach().clone().requires_grad_()
        F.linear(x2, W, lin.bias).pow(2).sum().backward()
        assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-4), backend
        assert not q.bias.requires_grad and all(not t.requires_grad for t in q.runtime_tensors())


def test_to_dtype_and_back_keeps_the_bytes():
    lin = linear()
    q = QuantLinear.from_linear(lin, "q5_0")
    packed = q.packed()
    q = q.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16 and q.weight.dtype == torch.bfloat16
    assert torch.equal(q.packed(), packed)
    y = q(torch.randn(2, 512, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 100)
    q = q.float()
    assert q.dtype == torch.float32 and torch.equal(q.packed(), packed)


def _no_float_weight_copy(model) -> None:
    for name, m in quant_modules(model).items():
        for t in m.runtime_tensors():
            if t.is_floating_point():  # biases and the kernel's per-group scales only
                assert t.numel() < m.out_features * m.in_features / 8, (name, tuple(t.shape))
        # the kernel's form: 4-bit planes + bf16 scale/zero pairs + the blocks' scale headers (~1.25x the
        # stored bytes, plus rows padded to a multiple of 16), never a float copy
        stored = m.out_features * m.fmt.row_bytes(m.in_features)
        assert m.nbytes() < 1.5 * stored + 8 * m.out_features, name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_quantized_model_directory_loads_packed(tmp_path, family):
    from quant.recipe import quantize_dir

    torch.manual_seed(0)
    model = tiny_model(family=family, n_embd=64)
    save_model(model, tmp_path / "fp")
    quantize_dir(tmp_path / "fp", tmp_path / "q", "q4_0", embeddings="q8_0")
    loaded, config = load_model(tmp_path / "q")
    assert config["format_version"] == 1 and config["quantization"]["type"] == "q4_0"
    mods = quant_modules(loaded)
    expected = {k[: -len(".weight")] for k in config["quantization"]["tensors"]}
    assert set(mods) == expected and "tok_emb" in mods
    assert isinstance(loaded.blocks[0].attn.q_proj, QuantLinear)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _no_float_weight_copy(loaded)
    # the same numbers as quantizing in memory, and close to the float model
    ref = quantize_model(tiny_model(family=family, n_embd=64), config["quantization"]["tensors"])
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
        fp = model(x)
        assert (loaded(x) - fp).abs().max() < 0.1 * fp.abs().max()
    # incremental decoding with the KV cache matches the full forward
    cache = loaded.new_cache(1)
    with torch.no_grad():
        steps = torch.cat([loaded(x[:1, i:i + 1], cache=cache) for i in range(8)], dim=1)
        assert torch.allclose(steps, loaded(x[:1, :8]), atol=1e-2)


def test_quantize_model_in_place_and_backend_switch():
    model = tiny_model(n_embd=64)
    types = {f"blocks.{i}.mlp.up_proj.weight": "nf4" for i in range(2)} | {"tok_emb.weight": "q4_1"}
    quantize_model(model, types)
    assert isinstance(model.blocks[1].mlp.up_proj, QuantLinear) and isinstance(model.tok_emb, QuantEmbedding)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        a = model(x)
        set_backend(model, "blocks")
        assert all(m.kernel == "dequantize" for m in quant_modules(model).values())
        b = model(x)
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    assert all(isinstance(m, QuantModule) for m in quant_modules(model).values())
