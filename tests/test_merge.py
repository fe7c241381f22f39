"""`lbdl merge`: the streaming driver (lbdl_cli/merge/driver.py), its config and the command."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from lbdl_cli.checkpoint import save_model
from lbdl_cli.errors import ConfigError
from lbdl_cli.merge.config import MergeConfig, at_depth, layer_of, read_merge_config, tensor_parameters


def weights(d):
    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def family(tok_dir, tmp_path_factory):
    """A base and two fine-tunes of it (the base's weights plus different noise), with the tokenizer."""
    root = tmp_path_factory.mktemp("family")
    tokenizer = tok_dir / "tokenizer.model"
    base = tiny_model(vocab_size=400, block_size=64, n_layer=3)
    save_model(base, root / "base", tokenizer=tokenizer)
    for i in (1, 2):
        tuned = tiny_model(vocab_size=400, block_size=64, n_layer=3)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        save_model(tuned, root / f"ft{i}", tokenizer=tokenizer)
    return root


def test_task_arithmetic_adds_the_task_vectors_and_subtracts_one(cli, family, tmp_path):
    base, a, b = (weights(family / n) for n in ("base", "ft1", "ft2"))
    r = cli("merge", "--base", family / "base", "--model", family / "ft1", "--model", family / "ft2",
            "--weight", "1", "--weight", "0.5", "--out", tmp_path / "m", "--json")
    assert r.code == 0, r.err
    assert r.json()["tensors"] == len(base) and r.json()["n_layer"] == 3
    out = weights(tmp_path / "m")
    assert out.keys() == base.keys()
    for k in base:
        torch.testing.assert_close(out[k], base[k] + (a[k] - base[k]) + 0.5 * (b[k] - base[k]), rtol=0, atol=1e-6)
    assert cli("merge", "--base", family / "base", "--model", family / "ft1", "--weight", "-1",
               "--out", tmp_path / "neg").code == 0
    neg = weights(tmp_path / "neg")
    for k in base:
        torch.testing.assert_close(neg[k], 2 * base[k] - a[k], rtol=0, atol=1e-6)
    # the directory is a model: config, tokenizer (and its hash) and the merge config to rerun it
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["n_layer"] == 3 and config["merge"]["method"] == "task_arithmetic"
    assert config["tokenizer"] == json.loads((family / "base" / "config.json").read_text())["tokenizer"]
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == (family / "base" / "tokenizer.model").read_bytes()
    assert cli("merge", "--config", tmp_path / "m" / "merge.json", "--out", tmp_path / "again").code == 0
    again = weights(tmp_path / "again")
    assert all(torch.equal(again[k], out[k]) for k in out)
    assert cli("generate", tmp_path / "m", "To be", "-n", "4", "--compute-dtype", "float32").code == 0


def test_weight_zero_and_identical_models_return_the_model(cli, family, tmp_path):
    base, a = weights(family / "base"), weights(family / "ft1")
    for method, extra in (("task_arithmetic", []), ("ties", ["--density", "0.5"]), ("dare_ties", ["--density", "0.5"])):
        r = cli("merge", "--method", method, "--base", family / "base", "--model", family / "ft1", "--weight", "0",
                *extra, "--out", tmp_path / method)
        assert r.code == 0, r.err
        out = weights(tmp_path / method)
        assert all(torch.allclose(out[k], base[k], atol=1e-6) for k in base), method
    for method in ("linear", "slerp"):
        r = cli("merge", "--method", method, "--model", family / "ft1", "--model", family / "ft1",
                "--out", tmp_path / f"same-{method}")
        assert r.code == 0, r.err
        out = weights(tmp_path / f"same-{method}")
        assert all(torch.allclose(out[k], a[k], atol=1e-6) for k in a), method


def test_ties_and_dare_are_seeded_per_tensor(cli, family, tmp_path):
    common = ["--base", family / "base", "--model", family / "ft1", "--model", family / "ft2", "--density", "0.3"]
    for name, seed in (("s1", "1"), ("s1b", "1"), ("s2", "2")):
        assert cli("merge", "--method", "dare_ties", *common, "--seed", seed, "--out", tmp_path / name).code == 0
    s1, s1b, s2 = (weights(tmp_path / n) for n in ("s1", "s1b", "s2"))
    assert all(torch.equal(s1[k], s1b[k]) for k in s1)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)


def test_an_adapter_is_its_task_vector(cli, family, tmp_path):
    """A LoRA adapter over the base merges as base + s B A: task arithmetic of one adapter at weight 1 is
    `lbdl lora merge`."""
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    model, _ = load_model(family / "base")
    cfg = LoRAConfig(rank=2, alpha=4)
    apply_lora(model, cfg)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.1)
    save_adapter(model, cfg, tmp_path / "adapter", base_dir=family / "base")
    assert cli("lora", "merge", family / "base", tmp_path / "adapter", "--out", tmp_path / "folded").code == 0
    r = cli("merge", "--base", family / "base", "--model", tmp_path / "adapter", "--out", tmp_path / "m")
    assert r.code == 0, r.err
    folded, merged = weights(tmp_path / "folded"), weights(tmp_path / "m")
    assert all(torch.allclose(merged[k], folded[k], atol=1e-6) for k in folded)
    r = cli("merge", "--method", "linear", "--model", tmp_path / "adapter", "--model", family / "ft1",
            "--out", tmp_path / "x")
    assert r.code == 2 and "is a LoRA adapter: give the model it adapts as --base" in r.err


def test_passthrough_stacks_slices_of_blocks(cli, family, tmp_path):
    a, b = weights(family / "ft1"), weights(family / "ft2")
    r = cli("merge", "--slice", f"{family / 'ft1'}:0:2", "--slice", f"{family / 'ft2'}:1:3", "--out", tmp_path / "p",
            "--json")
    assert r.code == 0 and r.json()["n_layer"] == 4, r.err
    out = weights(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["model"]["n_layer"] == 4
    for k, v in out.items():
        if k.startswith("blocks."):
            i, rest = int(k.split(".")[1]), k.split(".", 2)[2]
            src, j = (a, i) if i < 2 else (b, i - 1)
            assert torch.equal(v, src[f"blocks.{j}.{rest}"]), k
        else:  # outside the blocks: the embeddings from the first slice's model, the final norm from the last's
            assert torch.equal(v, (a if k.startswith(("tok_emb", "pos_emb")) else b)[k]), k
    assert cli("generate", tmp_path / "p", "To be", "-n", "3", "--compute-dtype", "float32").code == 0
    r = cli("merge", "--slice", f"{family / 'ft1'}:2:9", "--out", tmp_path / "bad")
    assert r.code == 2 and "layers [2, 9] but it has 3 blocks" in r.err and not (tmp_path / "bad").exists()


def test_refusals_write_nothing(cli, family, tok_dir, tmp_path):
    other = tmp_path / "wide"
    save_model(tiny_model(vocab_size=400, block_size=64, n_layer=3, n_embd=48), other,
               tokenizer=tok_dir / "tokenizer.model")
    untok = tmp_path / "untok"
    save_model(tiny_model(vocab_size=400, block_size=64, n_layer=3), untok)
    (untok / "tokenizer.model").write_bytes(b"not the same")
    assert cli("quantize", family / "ft1", "--type", "q8_0", "--out", tmp_path / "q8").code == 0
    base = ["--base", family / "base"]
    cases = [
        ([*base, "--model", other], "is another architecture than"),
        ([*base, "--model", untok], "has another tokenizer than"),
        ([*base, "--model", tmp_path / "q8"], "is quantized (q8_0); merging needs float weights: add --dequantize"),
        (["--method", "ties", "--model", family / "ft1"], "ties needs the base"),
        (["--method", "slerp", "--model", family / "ft1"], "slerp interpolates two models; 1 were given"),
        (["--method", "nope", "--model", family / "ft1"], "merge method 'nope' is not one of"),
        ([*base, "--model", family / "ft1", "--weight", "1", "--weight", "2"], "2 --weight for 1 --model"),
        ([*base, "--model", family / "ft1", "--density", "0.5"], "unknown parameter 'density'"),
        ([*base, "--model", family / "ft1", "--method", "ties", "--density", "1.5"], "density must be in (0, 1]"),
    ]
    for args, says in cases:
        r = cli("merge", *args, "--out", tmp_path / "out")
        assert r.code == 2 and says in r.err and r.err.count("\n") == 1, (args, r.err)
        assert not (tmp_path / "out").exists()
    r = cli("merge", *base, "--model", tmp_path / "q8", "--dequantize", "--out", tmp_path / "deq")
    assert r.code == 0, r.err
    deq, ft1 = weights(tmp_path / "deq"), weights(family / "ft1")
    assert all(torch.allclose(deq[k], ft1[k], atol=0.01) for k in ft1)  # q8_0's rounding only


def test_per_tensor_parameters_and_gradients(tmp_path):
    cfg = MergeConfig.from_dict({"method": "ties", "base": "b", "models": [{"model": "m", "weight": [0.0, 1.0]}],
                                 "parameters": {"density": 0.5, "lambda": [1.0, 2.0, 4.0]},
                                 "tensors": [{"match": "blocks.*.mlp.*", "density": 0.2}]})
    assert layer_of("tok_emb.weight", 5) == 0 and layer_of("blocks.2.attn.q_proj.weight", 5) == 0.5
    assert layer_of("norm_f.weight", 5) == 1 and at_depth([1.0, 2.0, 4.0], 0.75, "x") == 3.0
    assert tensor_parameters(cfg, "blocks.2.mlp.up_proj.weight", 5) == {"density": 0.2, "lambda": 2.0}
    assert tensor_parameters(cfg, "blocks.4.attn.q_proj.weight", 5) == {"density": 0.5, "lambda": 4.0}
    (tmp_path / "m.toml").write_text('method = "linear"\n[[models]]\nmodel = "a"\n[[models]]\nmodel = "b"\n'
                                     'weight = 2\n')
    assert read_merge_config(tmp_path / "m.toml").models[1].weight == 2
    (tmp_path / "bad.toml").write_text('method = "linear"\nmodles = []\n')
    with pytest.raises(ConfigError, match="unknown key 'modles'"):
        read_merge_config(tmp_path / "bad.toml")
