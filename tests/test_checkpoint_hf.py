"""Hugging Face import/export: logits parity with transformers (the oracle)."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from lbdl_cli.checkpoint import load_model, save_model
from lbdl_cli.checkpoint.hf import export_hf, import_hf
from lbdl_cli.errors import CheckpointError

transformers = pytest.importorskip("transformers")

V = 113


def gpt2(tie=True):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama(n_kv=2, tie=False, theta=10000.0, bias=False):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                                   rope_theta=theta, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
                                   rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def randomize(model):
    """transformers zero-initialises some tensors (biases, norms): make every tensor count."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and ("ln_" in name or "norm" in name) and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


CASES = {
    "gpt2-tied": lambda: gpt2(tie=True),
    "gpt2-untied": lambda: gpt2(tie=False),
    "llama-gqa-untied": lambda: llama(n_kv=2, tie=False),
    "llama-mha-tied-theta500": lambda: llama(n_kv=4, tie=True, theta=500.0),
    "llama-gqa-bias": lambda: llama(n_kv=1, bias=True),
}


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_logits(case, tmp_path):
    hf = randomize(CASES[case]())
    hf.save_pretrained(tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "lbdl")
    model, config = load_model(tmp_path / "lbdl")
    assert result["params"] == sum(p.numel() for p in hf.parameters())
    assert config["source"]["hf_architecture"] == type(hf).__name__
    x = torch.randint(0, V, (2, 40))
    torch.testing.assert_close(model(x), hf_logits(hf, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_transformers_and_round_trips(case, tmp_path):
    hf = randomize(CASES[case]())
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "a")
    export_hf(tmp_path / "a", tmp_path / "hf2")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(reloaded) is type(hf)
    x = torch.randint(0, V, (2, 40))
    torch.testing.assert_close(hf_logits(reloaded, x), hf_logits(hf, x), atol=1e-4, rtol=0)
    import_hf(tmp_path / "hf2", tmp_path / "b")
    a, b = load_model(tmp_path / "a")[0].state_dict(), load_model(tmp_path / "b")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lbdl_made_models_export_to_both_families(tmp_path):
    for family, arch in (("gpt2", transformers.GPT2LMHeadModel), ("llama", transformers.LlamaForCausalLM)):
        model = tiny_model(family=family)
        save_model(model, tmp_path / family)
        export_hf(tmp_path / family, tmp_path / f"{family}-hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{family}-hf").eval()
        assert isinstance(hf, arch)
        x = torch.randint(0, 97, (1, 30))
        with torch.no_grad():
            torch.testing.assert_close(hf_logits(hf, x), model(x), atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path):
    hf = randomize(llama())
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    import_hf(tmp_path / "hf", tmp_path / "lbdl")
    x = torch.randint(0, V, (1, 16))
    torch.testing.assert_close(load_model(tmp_path / "lbdl")[0](x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_legacy_gpt2_keys_without_prefix(tmp_path):
    hf = randomize(gpt2())
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    legacy = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the old causal-mask buffer
    save_file(legacy, path)
    import_hf(tmp_path / "hf", tmp_path / "lbdl")
    x = torch.randint(0, V, (1, 16))
    torch.testing.assert_close(load_model(tmp_path / "lbdl")[0](x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_dtype_kept_except_float16(tmp_path):
    hf = randomize(llama())
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    import_hf(tmp_path / "bf16", tmp_path / "a")
    assert {p.dtype for p in load_model(tmp_path / "a")[0].parameters()} == {torch.bfloat16}
    hf.to(torch.float16).save_pretrained(tmp_path / "fp16")
    import_hf(tmp_path / "fp16", tmp_path / "b")
    assert {p.dtype for p in load_model(tmp_path / "b")[0].parameters()} == {torch.float32}


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CheckpointError, match="'BertForMaskedLM' is not supported; lbdl imports GPT2LMHeadModel"):
        import_hf(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_only_hf_directory_is_refused(tmp_path):
    hf = gpt2()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickle"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_hf_tensor_names_the_shapes(tmp_path):
    hf = gpt2()
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["n_positions"] = 32
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"pos_emb.weight has shape \[64, 48\] but the config expects \[32, 48\]"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_export_refuses_a_model_that_fits_no_family(tmp_path):
    save_model(tiny_model(positions="rope"), tmp_path / "m")  # GPT-2 shape but rotary positions
    with pytest.raises(CheckpointError, match="fits no Hugging Face architecture.*positions='rope'"):
        export_hf(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
