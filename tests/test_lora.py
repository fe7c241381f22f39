"""LoRA adapters (lbdl_cli.lora): the adapted layer, targets, merge, and the PEFT directory with PEFT as the oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_round_trips, tiny_model

from lbdl_cli.errors import CheckpointError, ConfigError
from lbdl_cli.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lbdl_cli.model import Linear

FAMILIES = ("gpt2", "llama")


def tokens(seed=0, n=2, t=12, vocab=97):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def randomize_B(model, seed=1, std=0.05):
    """Non-zero B everywhere, so that the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


# --- the config ------------------------------------------------------------------------------------------------


def test_config_defaults_ranges_and_round_trip():
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.init) == (8, 16.0, "gaussian")
    assert cfg.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert cfg.scale == 2.0 and LoRAConfig(rank=4, alpha=8, rslora=True).scale == 4.0
    assert_round_trips(LoRAConfig(rank=3, alpha=5.5, lora_dropout=0.1, rslora=True, init="kaiming",
                                  targets=("all-linear",)))
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"init": "zeros"}, {"targets": []}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LoRAConfig.from_dict(bad)


# --- the adapted layer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_model_equals_base_at_init_and_trains_only_A_B(family):
    model = tiny_model(family=family)
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
    report = apply_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        after = model(idx)
    assert torch.equal(before, after)  # B = 0: bit for bit
    assert report["modules"] == [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    kv = model.config.n_kv_head * model.config.head_dim
    per_block = 2 * 4 * (32 + 32) + 2 * 4 * (32 + kv)  # q and o: A 4x32, B 32x4; k and v: A 4x32, B kv x 4
    assert report["trainable_params"] == 2 * per_block
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["share"] == pytest.approx(report["trainable_params"] / report["total_params"])


def test_forward_known_answer_and_gradients():
    base = Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 2))
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + 1.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert base.weight.grad is None and not base.weight.requires_grad


def test_init_gaussian_and_kaiming_as_peft():
    torch.manual_seed(0)
    gauss = LoRALinear(Linear(512, 512), rank=16, alpha=16)
    assert gauss.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)  # PEFT "gaussian": std 1/R
    kaiming = LoRALinear(Linear(512, 512), rank=16, alpha=16, init="kaiming")
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan_in 512
    assert kaiming.lora_A.abs().max().item() <= bound and kaiming.lora_A.abs().max().item() > 0.9 * bound
    assert torch.count_nonzero(gauss.lora_B) == 0 and torch.count_nonzero(kaiming.lora_B) == 0
    assert LoRALinear(Linear(8, 8), rank=4, alpha=8, rslora=True).scale == 4.0


# --- targets ----------------------------------------------------------------------------------------------


def test_targets_globs_all_linear_and_errors():
    model = tiny_model(family="llama")
    assert apply_lora(model, LoRAConfig(rank=2, targets=("blocks.1.mlp.*",)))["modules"] == [
        "blocks.1.mlp.gate_proj", "blocks.1.mlp.up_proj", "blocks.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
    mods = apply_lora(tiny_model(family="llama"), LoRAConfig(rank=2, targets=("all-linear",)))["modules"]
    assert len(mods) == 2 * 7 and "lm_head" not in mods  # the head is left out, as PEFT's all-linear
    assert apply_lora(tiny_model(family="llama"), LoRAConfig(rank=2, targets=("lm_head",)))["modules"] == ["lm_head"]
    with pytest.raises(ConfigError, match=r"'qproj' matches no linear layer.*down_proj, .*q_proj"):
        apply_lora(tiny_model(), LoRAConfig(targets=("q_proj", "qproj")))
    with pytest.raises(ConfigError, match=r"rank 33 is larger than layer blocks.0.attn.q_proj's smaller side"):
        apply_lora(tiny_model(), LoRAConfig(rank=33))
    # llama's k_proj is 16 x 32 (grouped-query): rank 17 fits q but not k
    with pytest.raises(ConfigError, match=r"k_proj's smaller side \(16 x 32\); use a rank of at most 16"):
        apply_lora(tiny_model(family="llama"), LoRAConfig(rank=17))


# --- merge ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_exact_idempotent_and_unmerge(family):
    model = tiny_model(family=family)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("all-linear",)))
    randomize_B(model)
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)
    W = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(model).items()}
    merge_lora(model)
    for name, m in lora_modules(model).items():
        assert m.merged
        expected = W[name] + m.scale * (m.lora_B.detach() @ m.lora_A.detach())
        assert torch.equal(m.base_layer.weight, expected)  # W' = W + s B A exactly
    once = {n: m.base_layer.weight.clone() for n, m in lora_modules(model).items()}
    merge_lora(model)  # idempotent
    assert all(torch.equal(m.base_layer.weight, once[n]) for n, m in lora_modules(model).items())
    with torch.no_grad():
        merged = model(idx)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    unmerge_lora(model)
    for name, m in lora_modules(model).items():
        assert not m.merged
        torch.testing.assert_close(m.base_layer.weight, W[name], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_and_changes_nothing():
    layer = LoRALinear(Linear(4, 4), rank=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    W = layer.base_layer.weight.clone()
    with pytest.raises(CheckpointError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, W)


def test_remove_lora_keeps_a_merge_and_drops_an_unmerged_adapter():
    base = tiny_model()
    idx = tokens()
    with torch.no_grad():
        plain = base(idx)
    apply_lora(base, LoRAConfig(rank=4))
    randomize_B(base)
    with torch.no_grad():
        adapted = base(idx)
    assert not torch.allclose(adapted, plain)
    merge_lora(base)
    remove_lora(base)
    assert not lora_modules(base) and type(base.blocks[0].attn.q_proj) is Linear
    assert set(base.state_dict()) == set(tiny_model().state_dict())  # the base's own tensor names again
    with torch.no_grad():
        torch.testing.assert_close(base(idx), adapted, rtol=1e-5, atol=1e-5)
    other = tiny_model()
    apply_lora(other, LoRAConfig(rank=4))
    randomize_B(other)
    remove_lora(other)
    with torch.no_grad():
        assert torch.equal(other(idx), plain)


def test_lora_state_dict_holds_only_A_and_B():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, targets=("blocks.0.attn.v_proj",)))
    sd = lora_state_dict(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "blocks.0.attn.v_proj.lora_A": (2, 32), "blocks.0.attn.v_proj.lora_B": (32, 2)}


# --- a quantized base (QLoRA's layer) ----------------------------------------------------------------------------


def test_quantized_base_through_its_own_forward_merge_dequantizes():
    from quant.linear import QuantLinear, quantize_model, set_backend

    model = tiny_model(family="llama")
    quantize_model(model, {f"blocks.{i}.attn.{p}_proj.weight": "q8_0" for i in range(2) for p in "qkvo"})
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
    apply_lora(model, LoRAConfig(rank=4))
    q = model.blocks[0].attn.q_proj
    assert isinstance(q.base_layer, QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(idx), before)
    randomize_B(model)
    set_backend(model, "dequantize")  # float32 products, exactly the stored blocks: merged and not compare tightly
    packed = q.base_layer.packed().clone()
    W = q.base_layer.dequantize(torch.float32)
    with torch.no_grad():
        unmerged = model(idx)
    merge_lora(model)
    assert type(q.base_layer) is Linear
    assert torch.equal(q.base_layer.weight, W + q.scale * (q.lora_B.detach() @ q.lora_A.detach()))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert isinstance(q.base_layer, QuantLinear) and torch.equal(q.base_layer.packed(), packed)


# --- the PEFT directory ---------------------------------------------------------------------------------------


def base_dir(tmp_path, family, name="base"):
    from lbdl_cli.checkpoint import save_model

    return save_model(tiny_model(family=family), tmp_path / name)


def loaded(path):
    from lbdl_cli.checkpoint import load_model

    return load_model(path)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"),
                                     ("all-linear",)])
def test_save_load_round_trip(tmp_path, family, targets):
    base = base_dir(tmp_path, family)
    model = loaded(base)
    cfg = LoRAConfig(rank=4, alpha=8, targets=targets)
    apply_lora(model, cfg)
    randomize_B(model)
    idx = tokens()
    with torch.no_grad():
        expected = model(idx)
    save_adapter(model, cfg, tmp_path / "adapter", base_dir=base)
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 8
    assert len(written["lbdl_base_sha256"]) == 64
    other = loaded(base)
    report = load_adapter(other, tmp_path / "adapter", base_dir=base)
    assert report["config"] == cfg and report["modules"] == list(lora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(other(idx), expected, rtol=1e-6, atol=1e-6)


def test_adapter_keys_are_peft_names_of_the_hf_export(tmp_path):
    from safetensors import safe_open

    model = tiny_model(family="llama")
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj")))
    save_adapter(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj")), tmp_path / "a")
    with safe_open(tmp_path / "a" / ADAPTER_WEIGHTS, "pt") as f:
        keys = sorted(f.keys())
    assert keys[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert len(keys) == 8
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_load_refuses_another_base_a_wrong_shape_and_a_dir_without_config(tmp_path):
    base = base_dir(tmp_path, "llama")
    model = loaded(base)
    cfg = LoRAConfig(rank=2)
    apply_lora(model, cfg)
    save_adapter(model, cfg, tmp_path / "adapter", base_dir=base)
    other = base_dir(tmp_path, "llama", "other")
    with torch.no_grad():
        (o := loaded(other)).tok_emb.weight.add_(1)
    from lbdl_cli.checkpoint import save_model

    save_model(o, other, force=True)
    with pytest.raises(CheckpointError, match="trained on another base .*--force-base"):
        load_adapter(loaded(other), tmp_path / "adapter", base_dir=other)
    assert load_adapter(loaded(other), tmp_path / "adapter", base_dir=other, force_base=True)["modules"]
    wider = tiny_model(family="llama", n_embd=64)
    with pytest.raises(CheckpointError, match=r"tensor base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight "
                                              r"has shape \[2, 32\] but this model needs \[2, 64\]"):
        load_adapter(wider, tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        load_adapter(loaded(base), tmp_path / "empty")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    (tmp_path / "empty" / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not supported"):
        load_adapter(loaded(base), tmp_path / "empty")
    (tmp_path / "empty" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has no adapter_model.safetensors"):
        load_adapter(loaded(base), tmp_path / "empty")
    gpt2 = tiny_model()  # Llama names mean nothing to a GPT-2
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.k_proj.lora_A.weight names no linear layer"):
        load_adapter(gpt2, tmp_path / "adapter")
    assert not lora_modules(gpt2)  # nothing changed


# --- PEFT as the oracle --------------------------------------------------------------------------------------


def hf_export(tmp_path, family):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lbdl_cli.checkpoint.hf import export_hf

    base = base_dir(tmp_path, family)
    export_hf(base, tmp_path / "hf")
    return base, tmp_path / "hf"


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_lbdl_adapter_with_the_same_logits(tmp_path, family, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, hf = hf_export(tmp_path, family)
    model = loaded(base)
    cfg = LoRAConfig(rank=4, alpha=8, rslora=rslora, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    apply_lora(model, cfg)
    randomize_B(model)
    save_adapter(model, cfg, tmp_path / "adapter", base_dir=base)
    idx = tokens()
    with torch.no_grad():
        ours = model(idx)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), tmp_path / "adapter").eval()
    theirs = hf_logits(peft_model, idx)
    assert not torch.allclose(theirs, hf_logits(AutoModelForCausalLM.from_pretrained(hf).eval(), idx), atol=1e-3)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lbdl_loads_peft_adapter_with_the_same_logits(tmp_path, family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, hf = hf_export(tmp_path, family)
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "down_proj"]
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf), LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, init_lora_weights="gaussian",
        rank_pattern={targets[-1]: 2}, alpha_pattern={targets[-1]: 3}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    idx = tokens()
    theirs = hf_logits(peft_model, idx)
    model = loaded(base)
    with torch.no_grad():
        assert not torch.allclose(model(idx), theirs, atol=1e-3)  # the adapter matters
    report = load_adapter(model, tmp_path / "peft", base_dir=base)
    assert report["config"].rank == 4 and report["config"].alpha == 12
    with torch.no_grad():
        torch.testing.assert_close(model(idx), theirs, rtol=0, atol=1e-4)


def test_adapter_deltas_are_what_merging_adds(tmp_path):
    """adapter_deltas (the adapter as a task vector, read against a meta-device skeleton) equals merged - base,
    GPT-2's fused c_attn included."""
    from lbdl_cli.lora import adapter_deltas
    from lbdl_cli.model import GPT

    model = tiny_model(n_layer=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"))
    apply_lora(model, cfg)
    randomize_B(model)
    save_adapter(model, cfg, tmp_path / "a")
    merge_lora(model)
    remove_lora(model)
    with torch.device("meta"):
        skeleton = GPT(model.config)
    deltas = adapter_deltas(skeleton, tmp_path / "a")
    assert set(deltas) == {f"blocks.{i}.{n}.weight" for i in range(2)
                           for n in ("attn.q_proj", "attn.v_proj", "mlp.down_proj")}
    for name, delta in deltas.items():
        torch.testing.assert_close(base[name] + delta, model.state_dict()[name], rtol=0, atol=1e-6)
