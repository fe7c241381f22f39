"""lbdl_cli/kernels.py: the device resolver, the routing of products, the inference layout, the machine probe
and its cache, the choices the loaders take from it, and `lbdl info --system`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from lbdl_cli import kernels
from lbdl_cli.checkpoint import load_model, save_model
from lbdl_cli.errors import ConfigError
from lbdl_cli.progress import collect

FAST_BF16 = {"float32_prompt": 200.0, "bfloat16_prompt": 100.0, "float32_row": 50.0, "bfloat16_row": 25.0,
             "dequantize_row": 80.0, "int4pack_row": 10.0}  # an AVX-512 machine with native bfloat16
SLOW_BF16 = {"float32_prompt": 200.0, "bfloat16_prompt": 6000.0, "float32_row": 50.0, "bfloat16_row": 1500.0,
             "dequantize_row": 80.0, "int4pack_row": 120.0}  # AVX2 only: bfloat16 emulated, a slow int4 kernel


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    """This process's probes forgotten after each test (the cache directory is conftest's private one)."""
    monkeypatch.setattr(kernels, "_PROBES", {})


def force_probe(monkeypatch, timings: dict) -> kernels.Probe:
    p = kernels.Probe(cpu="test cpu", torch=torch.__version__, timings_us=dict(timings))
    monkeypatch.setattr(kernels, "probe", lambda refresh=False: p)
    return p


# --- devices -------------------------------------------------------------------------------------------------


def test_resolve_device():
    assert kernels.resolve_device("cpu") == torch.device("cpu")
    assert kernels.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert kernels.resolve_device(None) == kernels.resolve_device("auto")
    for bad in ("tpu", "cuda:x", "cpux"):
        with pytest.raises(ConfigError, match="unknown device"):
            kernels.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            kernels.resolve_device("cuda:0")


# --- products ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_split_gemv_equals_f_linear(parts, bias):
    w = torch.randn(97, 8).t().contiguous().t()  # (97, 8) column-major: outputs left over for 2, 3 and 4 parts
    b = torch.randn(97) if bias else None
    storage = torch.randn(20)
    for x in (torch.randn(1, 1, 8), torch.randn(1, 8), torch.randn(8), storage[5:13]):  # the last one at an offset
        torch.testing.assert_close(kernels.split_gemv(x, w, b, parts), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_gemv_without_onednn_equals_f_linear_and_restores_the_switch():
    torch.manual_seed(0)
    w, b = torch.randn(300, 64).bfloat16(), torch.randn(300).bfloat16()
    x = torch.randn(1, 1, 64).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    with torch.inference_mode():
        y = kernels.gemv_without_onednn(x, w, b)
        assert torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # the caller's choice is kept
        try:
            assert torch.equal(kernels.gemv_without_onednn(x, w, b), y) and not torch.backends.mkldnn.enabled
        finally:
            torch.backends.mkldnn.enabled = True
    assert y.dtype == torch.bfloat16  # float32 accumulation, one rounding of the product, one of the bias
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


def test_linear_routes_inference_by_dtype_rows_size_and_layout(monkeypatch):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    calls = []
    onednn, split, gemv = torch.ops.mkldnn._linear_pointwise, kernels.split_gemv, kernels.gemv_without_onednn

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.mkldnn, name)

        def _linear_pointwise(self, *args):
            calls.append("onednn")
            return onednn(*args)

    def spy(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)
        return run

    monkeypatch.setattr(torch.ops, "mkldnn", Spy())
    monkeypatch.setattr(kernels, "split_gemv", spy("split", split))
    monkeypatch.setattr(kernels, "gemv_without_onednn", spy("gemv", gemv))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = torch.randn(48, 32)
        large = torch.randn(kernels.LARGE_MATRIX // 256, 256)  # 1 MiB
        routes = {}
        for dtype in (torch.float32, torch.bfloat16):
            for name, w in (("small row", small), ("small column", small.t().contiguous().t()),
                            ("large row", large), ("large column", large.t().contiguous().t())):
                w = w.to(dtype)
                b = torch.randn(w.shape[0], dtype=dtype)
                for rows, x in (("one", torch.randn(1, 1, w.shape[1])), ("several", torch.randn(3, 7, w.shape[1]))):
                    x = x.to(dtype)
                    calls.clear()
                    tol = 1e-4 if dtype == torch.float32 else 2e-2
                    with torch.no_grad():
                        for bias in (b, None):
                            ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                            torch.testing.assert_close(kernels.linear(x, w, bias).float(), ref, rtol=tol,
                                                       atol=tol * ref.abs().max().item())
                    routes[str(dtype)[6:], name, rows] = "+".join(sorted(set(calls))) or "F.linear"
    finally:
        torch.set_num_threads(threads)
    assert routes == {
        ("float32", "small row", "one"): "F.linear", ("float32", "small row", "several"): "onednn",
        ("float32", "small column", "one"): "F.linear", ("float32", "small column", "several"): "F.linear",
        ("float32", "large row", "one"): "onednn", ("float32", "large row", "several"): "onednn",
        ("float32", "large column", "one"): "split", ("float32", "large column", "several"): "onednn",
        ("bfloat16", "small row", "one"): "gemv", ("bfloat16", "small row", "several"): "F.linear",
        ("bfloat16", "small column", "one"): "F.linear", ("bfloat16", "small column", "several"): "F.linear",
        ("bfloat16", "large row", "one"): "gemv", ("bfloat16", "large row", "several"): "F.linear",
        ("bfloat16", "large column", "one"): "F.linear", ("bfloat16", "large column", "several"): "F.linear",
    }
    calls.clear()
    w, b = torch.randn(48, 32, requires_grad=True), torch.randn(48, requires_grad=True)
    x = torch.randn(2, 32)
    y = kernels.linear(x, w, b)  # gradients on: F.linear, differentiable
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.linear(x, w, b).dtype == torch.bfloat16  # autocast keeps its say
        kernels.linear(x.half(), w.half())  # other dtypes
        kernels.linear(torch.randn(32, 2).t(), w)  # a non-contiguous input
        kernels.linear(torch.randn(1, large.shape[0]), large[:, :128].t())  # a strided weight, neither layout
    assert calls == []


def test_compiled_float32_inference_matches_eager():
    """torch.compile traces `linear` too (a compiled training run evaluates under no_grad):
    it must hand the product to the compiler, not to the oneDNN op the compiler cannot lower."""
    model = tiny_model()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# --- the inference layout --------------------------------------------------------------------------------------


def column_major(w) -> bool:
    return w.stride() == (1, w.shape[0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_inference_layout_keeps_values_outputs_and_saving(family, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)  # a torch without oneDNN: all column-major
    model = tiny_model(family=family)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kernels.inference_layout(model.matrices())
    assert all(column_major(w) for w in model.matrices())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    save_model(model, tmp_path / "m")
    reloaded, _ = load_model(tmp_path / "m")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k])


def test_inference_layout_rule_by_dtype_size_and_shape():
    from lbdl_cli.model import GPT, ModelConfig

    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    model = GPT(ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=4, n_embd=512)).eval()
    assert len(model.matrices()) == 7  # q, k, v, o, up, down, and the tied head
    kernels.inference_layout(model.matrices())
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert column_major(attn.q_proj.weight) and column_major(mlp.up_proj.weight)  # 1 MiB+, out >= in: split
    assert mlp.down_proj.weight.is_contiguous()  # 4 MiB, 512 outputs of 2048 inputs: oneDNN
    assert column_major(model.tok_emb.weight)  # 97 x 512: small, MKL
    model.to(torch.bfloat16)  # .to() keeps each matrix's layout
    assert not all(w.is_contiguous() for w in model.matrices())
    kernels.inference_layout(model.matrices())
    assert all(w.is_contiguous() for w in model.matrices())  # bfloat16 goes row-major: gemv_without_onednn


def test_no_product_of_another_thread_runs_while_onednn_is_off():
    """A bfloat16 generation in one thread turns oneDNN off for single products only; another thread's
    products (under the same lock, as every bfloat16 product of `linear`) always find it on."""
    import threading

    from lbdl_cli.sample import SamplingConfig, generate

    model = tiny_model(family="llama").to(torch.bfloat16)
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            with kernels.ONEDNN_LOCK:
                seen.append(torch.backends.mkldnn.enabled)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        [out] = generate(model, None, [[1, 2, 3]], SamplingConfig(temperature=0.0, max_new_tokens=40))
    finally:
        done.set()
        watcher.join()
    assert len(out.token_ids) == 40 and seen and all(seen) and torch.backends.mkldnn.enabled


def test_inference_layout_leaves_quantized_and_other_weights_alone():
    from quant.linear import quantize_model

    model = quantize_model(tiny_model(), {"blocks.0.mlp.up_proj.weight": "q4_0", "tok_emb.weight": "q8_0"})
    half = torch.randn(40, 40).half()
    matrices = model.matrices() + [half, torch.randn(4)]
    kernels.inference_layout(matrices)  # the quantized head (a QuantWeight) and the others pass untouched
    assert half.is_contiguous() and model.tok_emb.weight.qtype == "q8_0"
    assert column_major(model.blocks[1].mlp.up_proj.weight)


# --- the probe and its cache ------------------------------------------------------------------------------------


def test_probe_decisions_known_answers():
    fast = kernels.Probe(cpu="c", torch="t", timings_us=FAST_BF16)
    slow = kernels.Probe(cpu="c", torch="t", timings_us=SLOW_BF16)
    assert fast.bfloat16_fast and fast.quant_backend == "int4pack"
    assert not slow.bfloat16_fast and slow.quant_backend == "dequantize"
    mixed = kernels.Probe(cpu="c", torch="t", timings_us={**FAST_BF16, "bfloat16_prompt": 300.0})
    assert not mixed.bfloat16_fast  # faster on one row but slower on a prompt: float32
    no_kernel = {k: v for k, v in FAST_BF16.items() if k != "int4pack_row"}
    assert kernels.Probe(cpu="c", torch="t", timings_us=no_kernel).quant_backend == "dequantize"
    assert kernels.Probe.from_dict(json.loads(json.dumps(fast.to_dict()))) == fast


def test_the_probe_measures_every_product_it_decides_by():
    timings = kernels._measure()
    expected = {"float32_prompt", "bfloat16_prompt", "float32_row", "bfloat16_row", "dequantize_row"}
    has_kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    assert set(timings) == expected | ({"int4pack_row"} if has_kernel else set())
    assert all(0 < t < float("inf") for t in timings.values())


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """An empty cache directory, and kernels._measure replaced by a counter that returns FAST_BF16."""
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def measure():
        calls.append(1)
        return dict(FAST_BF16)

    monkeypatch.setattr(kernels, "_measure", measure)
    return calls


def test_probe_is_measured_once_written_and_reused(measured, monkeypatch, tmp_path):
    path = kernels.probe_path()
    assert path.parent == tmp_path / "cache" and not path.exists()
    first = kernels.probe()
    assert measured == [1] and path.is_file()
    assert kernels.probe() is first  # this process: from memory
    monkeypatch.setattr(kernels, "_PROBES", {})  # another process: from the file
    assert kernels.probe() == first and measured == [1]
    assert json.loads(path.read_text())["timings_us"] == FAST_BF16
    kernels.probe(refresh=True)
    assert measured == [1, 1]


def test_probe_cache_is_keyed_by_cpu_and_torch_version(measured, monkeypatch):
    kernels.probe()
    path = kernels.probe_path()
    monkeypatch.setattr(kernels, "cpu_model", lambda: "another cpu")
    assert kernels.probe_path() != path
    assert kernels.probe().cpu == "another cpu" and measured == [1, 1]
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    other_torch = kernels.probe_path()
    assert other_torch not in (path,) and kernels.probe().torch == "9.9.9" and measured == [1, 1, 1]
    assert len({path, kernels.probe_path(), other_torch}) == 2  # the last two are the same file


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 1}', "",
                                     '{"version": 1, "cpu": "x", "torch": "y", "timings_us": {"float32_row": 1}}'])
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(measured, content):
    path = kernels.probe_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    p = kernels.probe()
    assert measured == [1] and p.timings_us == FAST_BF16
    assert kernels.Probe.from_dict(json.loads(path.read_text())) == p


def test_a_probe_slowed_down_by_other_processes_is_not_written(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(kernels, "_measure", lambda: {**FAST_BF16, "float32_row": 2 * kernels.CONTENDED_US})
    kernels.probe()
    assert not kernels.probe_path().exists()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "mine"))
    assert kernels.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(kernels.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels.cache_dir() == tmp_path / "xdg" / "lbdl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernels.cache_dir() == tmp_path / "home" / ".cache" / "lbdl"


# --- the choices the loaders take ------------------------------------------------------------------------------


def test_compute_dtype_known_answers(monkeypatch):
    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    force_probe(monkeypatch, FAST_BF16)
    assert kernels.compute_dtype(bf16, None, "cpu") == (bf16, None)
    assert kernels.compute_dtype(f32, None, "cpu") == (f32, None)
    assert kernels.compute_dtype(f16, None, "cpu") == (f32, None)
    assert kernels.compute_dtype(f32, bf16, "cpu") == (bf16, None)
    force_probe(monkeypatch, SLOW_BF16)
    assert kernels.compute_dtype(bf16, None, "cpu") == (f32, None)
    assert kernels.compute_dtype(bf16, f32, "cpu") == (f32, None)
    dtype, note = kernels.compute_dtype(f32, bf16, "cpu")
    assert dtype == bf16 and "bfloat16 is slow on this CPU" in note and "30.0x" in note and "\n" not in note
    with pytest.raises(ConfigError, match="float16 is hundreds of times slower"):
        kernels.compute_dtype(f32, f16, "cpu")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A small bfloat16 model directory with the bundled model's tokenizer."""
    from lbdl_cli.checkpoint import TOKENIZER_FILE, default_model_dir

    out = tmp_path_factory.mktemp("bf16") / "m"
    save_model(tiny_model(vocab_size=4096).to(torch.bfloat16), out, tokenizer=default_model_dir() / TOKENIZER_FILE)
    return out


@pytest.mark.parametrize("timings, computes", [(FAST_BF16, torch.bfloat16), (SLOW_BF16, torch.float32)])
def test_load_for_inference_computes_stored_bfloat16_where_it_is_fast(bf16_dir, monkeypatch, timings, computes):
    from lbdl_cli.sample import SamplingConfig, generate, load_for_inference

    force_probe(monkeypatch, timings)
    events = []
    model, tok, _ = load_for_inference(bf16_dir, None, "cpu", progress=collect(events))
    assert {p.dtype for p in model.parameters()} == {computes} and events == []
    reference, _ = load_model(bf16_dir, dtype=computes)  # the plain path: no layout, F.linear everywhere
    x = torch.randint(0, 4096, (1, 20))
    with torch.no_grad():
        ref = reference(x).float()
        tol = 1e-5 if computes == torch.float32 else 2e-2
        torch.testing.assert_close(model(x).float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    [ours] = generate(model, None, [[5, 6, 7]], greedy)
    with torch.no_grad():  # the first token comes from the prefill: a full forward
        assert ours.token_ids[0] == int(reference(torch.tensor([[5, 6, 7]]))[0, -1].float().argmax())


def test_an_explicit_slow_dtype_is_honoured_with_a_warning(bf16_dir, monkeypatch):
    from lbdl_cli.sample import load_for_inference

    force_probe(monkeypatch, SLOW_BF16)
    events = []
    model, _, _ = load_for_inference(bf16_dir, "bfloat16", "cpu", progress=collect(events))
    assert model.tok_emb.weight.dtype == torch.bfloat16
    [event] = events
    assert event.level == "warning" and "bfloat16 is slow" in event.message
    events.clear()
    load_for_inference(bf16_dir, "float32", "cpu", progress=collect(events))
    assert events == []


def test_quant_backend_follows_the_probe_on_a_cpu(monkeypatch):
    force_probe(monkeypatch, FAST_BF16)
    assert kernels.quant_backend("cpu") == "int4pack"
    force_probe(monkeypatch, SLOW_BF16)
    assert kernels.quant_backend("cpu") == "dequantize"


# --- lbdl info --system ------------------------------------------------------------------------------------------


def test_info_system_shows_capabilities_timings_and_choices(cli, monkeypatch, tmp_path):
    force_probe(monkeypatch, SLOW_BF16)
    r = cli("info", "--system", "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert result["cpu"]["model"] == kernels.cpu_model() and result["cpu"]["torch"] == torch.__version__
    assert result["probe"]["timings_us"] == SLOW_BF16
    assert result["choices"]["compute_dtype_for_bfloat16_weights"] == "float32"
    assert result["choices"]["quant_backend"] == "dequantize"
    r = cli("info", "--system")
    assert r.code == 0 and "bfloat16 row" in r.out and "1,500.0" in r.out and "dequantize" in r.out
    save_model(tiny_model(), tmp_path / "m")
    both = cli("info", tmp_path / "m", "--system", "--json").json()
    assert both["params"] == tiny_model().num_params() and both["system"]["probe"]["timings_us"] == SLOW_BF16
    r = cli("info")
    assert r.code == 2 and "Missing argument" in r.err and "--system" in r.err
