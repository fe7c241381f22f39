import math

import pytest
import torch
from conftest import TINY_GPT2, TINY_LLAMA, tiny_model

from lbdl_cli.checkpoint import load_preset, preset_names
from lbdl_cli.errors import ConfigError
from lbdl_cli.model import GPT, ModelConfig, count_params, flops_per_token, random_token_loss


@pytest.mark.parametrize("bad, message", [
    (dict(n_embd=30, n_head=4), "multiple of n_head"),
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-1), "block_size"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(positions="alibi"), "positions must be one of"),
    (dict(dropout=1.0), "dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(n_embd=36, n_head=4, positions="rope"), "even head size"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**TINY_GPT2, **bad})


def test_config_defaults_and_round_trip():
    cfg = ModelConfig(**TINY_GPT2)
    assert cfg.n_kv_head == cfg.n_head and cfg.intermediate_size == 4 * cfg.n_embd
    llama = ModelConfig(**{**TINY_LLAMA, "n_embd": 256, "n_head": 8})
    assert llama.intermediate_size == 704  # 8/3 * 256 = 682, rounded up to a multiple of 64
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


def test_param_count_known_answer():
    # GPT-2 family, tied: wte V*C + wpe T*C + L*(2 LN (2C each) + qkvo 4(C*C+C) + mlp C*4C+4C + 4C*C+C) + ln_f 2C
    V, T, L, C = 97, 32, 2, 32
    per_layer = 4 * C + 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = V * C + T * C + L * per_layer + 2 * C
    assert count_params(ModelConfig(**TINY_GPT2)) == expected == tiny_model().num_params()
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_params() == expected + V * C


def test_gpt2_124m_preset_has_gpt2_small_parameter_count():
    cfg, _ = load_preset("gpt2-124m")
    assert count_params(cfg) == 124_439_808  # Hugging Face gpt2: 124,439,808 parameters


def test_flops_per_token_known_answer():
    cfg = ModelConfig(**TINY_GPT2)
    C, L, V, T = 32, 2, 97, 16
    matmul = L * (4 * C * C + 8 * C * C) + C * V
    assert flops_per_token(cfg, T, training=False) == 2 * matmul + 4 * L * T * C
    assert flops_per_token(cfg, T) == 3 * flops_per_token(cfg, T, training=False)


@pytest.mark.parametrize("preset", ["nano", "micro", "llama-tiny", "gpt2-124m"])
def test_fresh_model_loss_is_near_ln_vocab(preset):
    cfg, _ = load_preset(preset)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert abs(random_token_loss(model) - math.log(cfg.vocab_size)) < 0.1


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_GPT2, "n_embd": 256, "n_head": 4, "n_layer": 8})
    model = GPT(cfg)
    std = model.blocks[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.blocks[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.q_proj.bias.abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_is_causal(family):
    model = tiny_model(family=family)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(family):
    model = tiny_model(family=family)
    x = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:17], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(17, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert all(qkv is not None for qkv in cache.qkv)  # the cached path ran the stacked q/k/v matrices


def test_a_cache_takes_the_qkv_weights_as_they_are_when_made():
    model = tiny_model()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        before = model.new_cache(1)
        for block in model.blocks:
            block.attn.v_proj.weight.mul_(2.0)
        full = model(x)
        after = model.new_cache(1)
        torch.testing.assert_close(model(x, cache=after), full, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, cache=before), full, atol=1e-3)
    assert model.train().new_cache(1).qkv == [None, None]  # training runs the separate projections


def test_context_longer_than_block_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with 2 kv heads == full multi-head attention whose k/v heads are the repeated pairs."""
    gqa = tiny_model(family="llama")
    mha = tiny_model(family="llama", n_kv_head=4)
    state = gqa.state_dict()
    hd = 8
    for i in range(2):
        for p in ("k_proj", "v_proj"):
            w = state[f"blocks.{i}.attn.{p}.weight"].view(2, hd, 32)
            state[f"blocks.{i}.attn.{p}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_tied_head_is_the_embedding():
    model = tiny_model()
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    x = torch.randint(0, 97, (1, 8))
    model(x, targets=x).backward()
    assert model.tok_emb.weight.grad is not None
    untied = tiny_model(family="llama")
    assert untied.lm_head is not None and "lm_head.weight" in untied.state_dict()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_parameter_gets_a_gradient(family):
    model = tiny_model(family=family).train()
    x = torch.randint(0, 97, (2, 16))
    model(x[:, :-1], targets=x[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_ignores_minus_100_targets():
    model = tiny_model()
    x = torch.randint(0, 97, (1, 9))
    targets = x[:, 1:].clone()
    targets[:, :4] = -100
    logits = model(x[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], targets[0, 4:])
    torch.testing.assert_close(model(x[:, :-1], targets=targets), expected)
    summed = torch.nn.functional.cross_entropy(logits[0, 4:], targets[0, 4:], reduction="sum")
    torch.testing.assert_close(model(x[:, :-1], targets=targets, reduction="sum"), summed)
    model.train().set_checkpointing(1)  # the checkpointed loss sums the same
    torch.testing.assert_close(model(x[:, :-1], targets=targets, reduction="sum"), summed)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_bfloat16_forward_close_to_float32():
    model = tiny_model(family="llama")
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(x)
        low = model.to(torch.bfloat16)(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05


def analytic_params(cfg: ModelConfig) -> int:
    """The parameter count of a config from its shapes alone: embeddings, per block two norms, q/k/v/o and
    the MLP's two (gelu) or three (swiglu) matrices with their biases, the final norm, an untied head."""
    C, F_, kv = cfg.n_embd, cfg.intermediate_size, cfg.n_kv_head * cfg.head_dim
    bias = cfg.bias
    norm = C * (2 if cfg.norm == "layernorm" and bias else 1)
    attn = 2 * (C * C + C * bias) + 2 * (C * kv + kv * bias)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * F_ + ((2 if cfg.mlp == "swiglu" else 1) * F_ + C) * bias
    positions = cfg.block_size * C if cfg.positions == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * C
    return cfg.vocab_size * C + positions + cfg.n_layer * (2 * norm + attn + mlp) + norm + head


def test_every_preset_builds_with_the_parameter_count_of_its_shapes():
    names = preset_names()
    assert {"gpt2-124m", "llama-tiny", "micro", "nano", "small"} <= set(names)
    for name in names:
        cfg, description = load_preset(name)
        assert description, name
        assert count_params(cfg) == analytic_params(cfg), name
    assert analytic_params(load_preset("gpt2-124m")[0]) == 124_439_808  # the formula itself, on a known answer
    llama = ModelConfig(**{**TINY_LLAMA, "n_embd": 64})
    assert GPT(llama).num_params() == analytic_params(llama)  # a real model, not the meta build count_params makes


@pytest.mark.parametrize("every, slice_rows", [(1, 5), (2, 32), (3, 1000)])
def test_gradient_checkpointing_gives_the_same_gradients(every, slice_rows, monkeypatch):
    """Recomputing the blocks in the backward (segments of `every`) and the loss in slices of rows changes
    memory, never the numbers: the same loss (up to the order of its sum) and the same gradients, dropout
    included (the RNG state is replayed), masked targets (-100) left out of the mean."""
    import lbdl_cli.model as model_module

    monkeypatch.setattr(model_module, "LOSS_SLICE", slice_rows * 97)  # rows per slice at vocab 97
    torch.manual_seed(0)
    model = tiny_model(n_layer=3, dropout=0.1).train()
    x = torch.randint(0, 97, (2, 16))
    targets = x.clone()
    targets[0, :7] = -100
    grads = []
    for setting in (0, every):
        model.set_checkpointing(setting)
        model.zero_grad()
        torch.manual_seed(1)
        loss = model(x, targets=targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = grads
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():  # inference is untouched by the setting
        assert torch.equal(model(x), model.set_checkpointing(0) or model(x))
