"""Hugging Face import/export: logits parity with transformers (the oracle)."""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import SEP, tiny_model
from safetensors.torch import load_file, save_file

from lbdl_cli.checkpoint import load_model, save_model
from lbdl_cli.checkpoint.hf import export_hf, import_hf
from lbdl_cli.errors import CheckpointError

transformers = pytest.importorskip("transformers")

V = 113
ROOT = Path(__file__).resolve().parents[1]
EXPORTED_FILES = ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json"]


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


def test_lbdl_made_models_export_to_both_families(tok_dir, tok, tmp_path):
    """A model with its tokenizer: transformers loads both, its tokenizer gives lbdl's ids and text back, its
    logits on those ids are lbdl's, and config.json names the tokenizer's <bos>/<eos>/<pad>."""
    text = "To be, or not to be:\n  that is\tthe question. \u2581 😀" + SEP
    for family, arch in (("gpt2", transformers.GPT2LMHeadModel), ("llama", transformers.LlamaForCausalLM)):
        model = tiny_model(family=family, vocab_size=tok.vocab_size, block_size=64)
        save_model(model, tmp_path / family, tokenizer=tok_dir / "tokenizer.model")
        result = export_hf(tmp_path / family, tmp_path / f"{family}-hf")
        out = tmp_path / f"{family}-hf"
        assert result["files"] == sorted(p.name for p in out.iterdir()) == EXPORTED_FILES
        assert (out / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
        config = json.loads((out / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
            tok.bos_id, tok.eos_id, tok.pad_id)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert isinstance(hf, arch)
        assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (1, 2, 3)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        assert hf_tok.model_max_length == 64
        x = hf_tok(text, return_tensors="pt").input_ids
        assert x[0].tolist() == tok.encode(text, allow_special=True) and x[0, -1] == tok.special_tokens[SEP]
        assert hf_tok.decode(x[0]) == text
        with torch.no_grad():
            torch.testing.assert_close(hf_logits(hf, x), model(x), atol=1e-4, rtol=0)


def test_export_without_a_tokenizer_names_no_special_ids(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    result = export_hf(tmp_path / "m", tmp_path / "hf")
    assert result["files"] == ["config.json", "model.safetensors"] and result["hf_tokenizer"] is False
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] is config["eos_token_id"] is config["pad_token_id"] is None  # not GPT-2's 50256


def test_export_of_a_foreign_sentencepiece_tokenizer_keeps_its_model_file(tmp_path):
    """A tokenizer without lbdl's settings (sentencepiece's defaults: dummy prefix, NFKC, no <pad>) has no exact
    tokenizer.json: the export keeps its tokenizer.model and names its ids."""
    lines = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000].splitlines()
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, model_type="bpe",
                                   vocab_size=300, minloglevel=2)
    (tmp_path / "foreign.model").write_bytes(writer.getvalue())
    save_model(tiny_model(vocab_size=300), tmp_path / "m", tokenizer=tmp_path / "foreign.model")
    result = export_hf(tmp_path / "m", tmp_path / "hf")
    assert result["files"] == ["config.json", "model.safetensors", "tokenizer.model"]
    assert result["hf_tokenizer"] is False
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)


def test_export_refuses_a_tokenizer_that_is_not_the_models(tok_dir, tmp_path):
    save_model(tiny_model(), tmp_path / "m")  # 97 ids; the tokenizer dropped in beside it has 400
    shutil.copyfile(tok_dir / "tokenizer.model", tmp_path / "m" / "tokenizer.model")
    with pytest.raises(CheckpointError, match="has 400 tokens but the model's vocabulary has 97"):
        export_hf(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CheckpointError, match="'BertForMaskedLM' is not supported; lbdl imports GPT2LMHeadModel"):
        import_hf(tmp_path / "hf", tmp_path / "out")
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


# --- import reads only inside its directory, and reports broken files in one line -----------------------


def sharded(tmp_path) -> Path:
    """A sharded Llama checkpoint with one shard moved outside its directory (to tmp_path/outside.safetensors)."""
    randomize(llama()).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "hf" / shard).rename(tmp_path / "outside.safetensors")
    return tmp_path / "hf"


def rewrite_index(hf_dir: Path, old: str, new: str) -> None:
    path = hf_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_import_refuses_a_weight_map_entry_outside_its_directory(how, tmp_path):
    hf_dir = sharded(tmp_path)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    if how == "symlink":
        os.symlink(tmp_path / "outside.safetensors", hf_dir / shard)
        entry = shard
    else:
        entry = "../outside.safetensors" if how == "dotdot" else str(tmp_path / "outside.safetensors")
        rewrite_index(hf_dir, shard, entry)
    with pytest.raises(CheckpointError, match=f"weight_map entry {entry!r} points outside {hf_dir}"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_reads_a_shard_in_a_subdirectory(tmp_path):
    """Inside is inside: an entry naming a subdirectory (or a symlink to a file of the directory) is followed."""
    hf_dir = sharded(tmp_path)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (hf_dir / "shards").mkdir()
    (tmp_path / "outside.safetensors").rename(hf_dir / "shards" / shard)
    rewrite_index(hf_dir, shard, f"shards/../shards/{shard}")
    import_hf(hf_dir, tmp_path / "lbdl")
    assert load_model(tmp_path / "lbdl")[0].config.n_layer == 2


@pytest.mark.parametrize("name, content, error", [
    ("model.safetensors.index.json", b'{"weight_map": {"a": "b.safetensors",}',
     r"checkpoint index .*model.safetensors.index.json is not valid JSON \(line 1, column"),
    ("model.safetensors.index.json", b'{"metadata": {}}', "has no weight_map table"),
    ("model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": 3}}', "weight_map entry 3 .* not a file name"),
    ("config.json", bytes(range(256)), r"Hugging Face config .*config.json is not UTF-8 text"),
    ("config.json", b"[1, 2]", r"config.json must hold a JSON object, not array"),
])
def test_import_reports_a_broken_json_file_in_one_line(name, content, error, tmp_path):
    hf_dir = sharded(tmp_path)
    (hf_dir / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=error) as info:
        import_hf(hf_dir, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


# --- the output is checked before any work -----------------------------------------------------------------


def snapshot(dir: Path) -> dict:
    return {str(p.relative_to(dir)): p.read_bytes() for p in sorted(dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside"])
def test_import_and_export_refuse_an_output_in_their_input(where, cli, model_dir, tmp_path):
    """Even with --force, and before reading anything: the input's files are broken on purpose, so an error
    about them would mean the work started."""
    hf_dir = tmp_path / "hf"
    randomize(gpt2()).save_pretrained(hf_dir)
    (hf_dir / "config.json").write_bytes(b"\xff not json")
    model = tmp_path / "model"
    model.mkdir()
    for p in model_dir.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    (model / "model.safetensors").write_bytes(b"broken")
    for command, source in ((("import", hf_dir), hf_dir), (("export", model, "--to", "hf"), model)):
        before = snapshot(source)
        out = source if where == "same" else source / "sub"
        code, _, err = cli(*command, "--out", out, "--force")
        assert code == 2, err
        assert ("is the input" if where == "same" else "is inside the input") in err
        assert snapshot(source) == before and not (source / "sub").exists()
