"""quant/linear.py: QuantLinear == F.linear with the dequantized weight, packed storage only, model loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_model

from lbdl_cli.checkpoint import load_model, save_model
from quant.formats import FORMATS, dequantize, quantize
from quant.int4pack import int4_layout
from quant.linear import BACKENDS, QuantEmbedding, QuantLinear, QuantModule, quant_modules, quantize_model, set_backend

AFFINE = [n for n, f in FORMATS.items() if f.affine]
KERNEL = int4_layout() is not None


def linear(n_out=100, n_in=512, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def rel_err(y, ref) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n_out", [64, 100])  # 100: not a multiple of 16, so the kernel's rows are padded
def test_quant_linear_matches_f_linear_with_the_dequantized_weight(name, n_out, backend):
    lin = linear(n_out)
    q = QuantLinear.from_linear(lin, name)
    q.set_backend(backend)
    W = dequantize(quantize(lin.weight, name), name)
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        y, ref = q(x), F.linear(x, W, lin.bias)
        one = q(x[:1, :1])  # one row: a decoding step
    assert y.shape == (2, 3, n_out) and y.dtype == torch.float32
    if q.kernel == "int4pack":  # bfloat16 activations, scales and outputs: bf16's 2^-8 relative precision
        assert rel_err(y, ref) < 1e-2
        ref_bf16 = F.linear(x.bfloat16().float(), W, lin.bias)
        assert torch.allclose(y, ref_bf16, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    else:  # the exact weight: float32 products of the same numbers
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one, ref[:1, :1], rtol=1e-5, atol=1e-5)
    assert torch.equal(q.dequantize(), W)  # every form holds the very numbers of the stored blocks


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_takes_its_form_where_it_applies(backend):
    lin = linear()
    for name in FORMATS:
        q = QuantLinear.from_linear(lin, name)
        q.set_backend(backend)
        if not FORMATS[name].affine or backend == "blocks" or (backend == "int4pack" and not KERNEL):
            expected = "blocks"  # NF4 has no affine view; "int4pack" without the kernel keeps the bytes
        else:
            expected = backend
        assert q.kernel == expected, name
    with pytest.raises(ValueError, match="backend must be one of"):
        q.set_backend("auto")


def test_dequantize_backend_reuses_one_buffer_per_thread_and_never_under_autograd():
    import threading

    from quant import linear as qlinear

    a, b = (QuantLinear.from_linear(linear(n_out=64, seed=s), "q4_0") for s in (0, 1))
    for q in (a, b):
        q.set_backend("dequantize")
    with torch.no_grad():
        wa, wb = a._form.weight(torch.float32, reuse=True), b._form.weight(torch.float32, reuse=True)
    assert wa.data_ptr() == wb.data_ptr()  # one buffer: the second layer's weight overwrote the first
    other = []
    thread = threading.Thread(target=lambda: other.append(qlinear._buffer(64 * 512, torch.float32, wa.device)))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != wa.data_ptr()  # another thread (another generation) has its own
    x = torch.randn(3, 512, requires_grad=True)
    y = a(x)
    b(x)  # would overwrite a's weight, were it in the buffer that autograd saved
    y.pow(2).sum().backward()
    W = dequantize(a.packed(), "q4_0")
    torch.testing.assert_close(x.grad, 2 * F.linear(x, W, a.bias).detach() @ W, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["q4_1", "q8_0", "q5_k", "nf4"])
def test_packed_bytes_and_state_dict_round_trip_exactly(name, backend):
    lin = linear()
    packed = quantize(lin.weight, name)
    q = QuantLinear.from_linear(lin, name)
    q.set_backend(backend)
    assert torch.equal(q.packed(), packed)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.uint8 and torch.equal(sd["weight"], packed)
    assert torch.equal(sd["bias"], lin.bias)
    assert torch.equal(q.dequantize(), dequantize(packed, name))
    fresh = QuantLinear(512, 100, name, backend=backend)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.packed(), packed) and fresh.kernel == q.kernel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_k", "nf4"])
def test_embedding_rows_and_tied_head(name, backend):
    torch.manual_seed(2)
    emb = nn.Embedding(100, 256)
    q = QuantEmbedding.from_embedding(emb, name)
    q.set_backend(backend)
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
    for backend in BACKENDS:
        q = QuantLinear.from_linear(lin, "q4_1")
        q.set_backend(backend)
        x = torch.randn(3, 512, requires_grad=True)
        q(x).pow(2).sum().backward()
        x2 = x.detach().clone().requires_grad_()
        F.linear(x2, W, lin.bias).pow(2).sum().backward()
        assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-4), backend
        assert not q.bias.requires_grad and all(not t.requires_grad for t in q.runtime_tensors())


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_dtype_and_back_keeps_the_bytes(backend):
    lin = linear()
    q = QuantLinear.from_linear(lin, "q5_0")
    q.set_backend(backend)
    packed = q.packed()
    q = q.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16 and q.weight.dtype == torch.bfloat16
    assert torch.equal(q.packed(), packed)
    y = q(torch.randn(2, 512, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 100)
    q = q.float()
    assert q.dtype == torch.float32 and torch.equal(q.packed(), packed) and q.backend == backend


def _no_float_weight_copy(model) -> None:
    for name, m in quant_modules(model).items():
        for t in m.runtime_tensors():
            if t.is_floating_point():  # biases and the per-group scales (and offsets) only
                assert t.numel() < m.out_features * m.in_features / 8, (name, tuple(t.shape))
        stored = m.out_features * m.fmt.row_bytes(m.in_features)
        if m.kernel == "int4pack":  # 4-bit planes + bf16 scale/zero pairs + the blocks' scale headers (~1.25x
            # the stored bytes, plus rows padded to a multiple of 16)
            assert m.nbytes() < 1.5 * stored + 8 * m.out_features, name
        else:  # a byte per code, a float32 scale and offset per 32 weights, the headers: under 1.5 bytes a weight
            assert m.nbytes() < 1.5 * m.out_features * m.in_features, name


def quantized_dir(tmp_path, family: str):
    """(float model, a directory of it quantized: q4_0, embeddings and head q8_0)."""
    from quant.recipe import plan

    model = tiny_model(family=family, n_embd=64)
    types = plan({k: tuple(v.shape) for k, v in model.state_dict().items()}, "q4_0", embeddings="q8_0").types
    quantized = quantize_model(tiny_model(family=family, n_embd=64), types)
    save_model(quantized, tmp_path / "q", sections={"quantization": {"type": "q4_0", "tensors": types}})
    return model, tmp_path / "q"


@pytest.mark.parametrize("backend", ["int4pack", "dequantize"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_quantized_model_directory_loads_packed(tmp_path, family, backend):
    model, qdir = quantized_dir(tmp_path, family)
    loaded, config = load_model(qdir, quant_backend=backend)
    assert config["format_version"] == 1 and config["quantization"]["type"] == "q4_0"
    mods = quant_modules(loaded)
    expected = {k[: -len(".weight")] for k in config["quantization"]["tensors"]}
    assert set(mods) == expected and "tok_emb" in mods
    assert isinstance(loaded.blocks[0].attn.q_proj, QuantLinear)
    assert all(m.backend == backend for m in mods.values())
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _no_float_weight_copy(loaded)
    # the same numbers as quantizing in memory, and close to the float model
    ref = set_backend(quantize_model(tiny_model(family=family, n_embd=64), config["quantization"]["tensors"]),
                      backend)
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


@pytest.mark.parametrize("backend", ["int4pack", "dequantize"])
def test_load_model_takes_the_backend_the_machine_probe_chose(tmp_path, monkeypatch, backend):
    from lbdl_cli import kernels

    timings = {"float32_prompt": 1.0, "bfloat16_prompt": 1.0, "float32_row": 1.0, "bfloat16_row": 1.0,
               "dequantize_row": 2.0, "int4pack_row": 1.0 if backend == "int4pack" else 3.0}
    monkeypatch.setattr(kernels, "probe", lambda: kernels.Probe(cpu="test", torch="test", timings_us=timings))
    _, qdir = quantized_dir(tmp_path, "gpt2")
    loaded, _ = load_model(qdir)
    assert {m.backend for m in quant_modules(loaded).values()} == {backend}
    dequantizing, _ = load_model(qdir, quant_backend="dequantize")  # the reference: exact float32 products
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        tol = 2e-2 if backend == "int4pack" and KERNEL else 1e-5
        torch.testing.assert_close(loaded(x), dequantizing(x), rtol=tol, atol=tol * dequantizing(x).abs().max())


def test_quantize_model_in_place_and_backend_switch():
    model = tiny_model(n_embd=64)
    types = {f"blocks.{i}.mlp.up_proj.weight": "nf4" for i in range(2)} | {"tok_emb.weight": "q4_1"}
    quantize_model(model, types)
    assert isinstance(model.blocks[1].mlp.up_proj, QuantLinear) and isinstance(model.tok_emb, QuantEmbedding)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        a = model(x)
        set_backend(model, "blocks")
        assert all(m.kernel == "blocks" for m in quant_modules(model).values())
        b = model(x)
        set_backend(model, "dequantize")
        kernels = {name: m.kernel for name, m in quant_modules(model).items()}
        assert kernels == {"tok_emb": "dequantize", "blocks.0.mlp.up_proj": "blocks", "blocks.1.mlp.up_proj": "blocks"}
        c = model(x)
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, QuantModule) for m in quant_modules(model).values())


def test_quantize_model_reports_one_event_per_tensor():
    from lbdl_cli.progress import collect

    events = []
    types = {"blocks.0.mlp.up_proj.weight": "q4_0", "blocks.1.mlp.up_proj.weight": "q8_0"}
    quantize_model(tiny_model(), types, progress=collect(events))
    assert [(e.stage, e.done, e.total, e.unit, e.status) for e in events] == [
        ("quantizing", 1, 2, "tensors", "blocks.0.mlp.up_proj.weight"),
        ("quantizing", 2, 2, "tensors", "blocks.1.mlp.up_proj.weight")]


@pytest.mark.parametrize("fmt", ["q4_0", "nf4_dq", "q8_0"])
def test_the_backward_through_a_quantized_layer_dequantizes_again_and_keeps_no_weight(fmt):
    """QLoRA's frozen base: the gradient reaching x is that of the dequantized weight, and the autograd graph
    saves no (out x in) float copy of it between the forward and the backward."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = QuantLinear.from_linear(linear, fmt)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    (y * torch.arange(48.0)).sum().backward()
    assert (48, 64) not in saved and (64, 48) not in saved
    w = q.dequantize(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x2, w, q.bias) * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, torch.nn.functional.linear(x2, w, q.bias), rtol=1e-5, atol=1e-5)
