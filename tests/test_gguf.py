"""GGUF export and import (lbdl_cli/checkpoint/gguf.py): round trips of both families, float and quantized; the
file read back with gguf's own reader (metadata, tensor names and types, blocks, vocabulary); llama.cpp's rotary
layout checked against ggml's rope written out here; a converter-style file of a transformers model imported with
the same logits as transformers; bad input; and, where llama-cpp-python is installed, parity with llama.cpp."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SEP, random_hf_model, tiny_model
from test_tokenizer import KNOWN

from lbdl_cli.checkpoint import load_model, save_model
from lbdl_cli.checkpoint.gguf import export_gguf, from_ggml_rope, to_ggml_rope
from lbdl_cli.checkpoint.gguf_import import field_value, import_gguf, read_gguf
from lbdl_cli.checkpoint.gguf_vocab import read_vocab
from lbdl_cli.errors import CheckpointError
from lbdl_cli.model import apply_rope, rope_tables
from lbdl_cli.quantize import QuantizeConfig, quantize_dir
from tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

V = 400  # the shared tokenizer's vocabulary
MODELS = {  # name: tiny_model overrides
    "gpt2-tied": dict(),
    "gpt2-untied": dict(tie_embeddings=False),
    "llama-gqa-untied": dict(family="llama"),
    "llama-mha-tied-bias-theta": dict(family="llama", n_kv_head=4, tie_embeddings=True, bias=True,
                                      rope_theta=500000.0, norm_eps=1e-6),
}


def make(tmp_path, tok_dir, name="m", seed=0, dtype=None, **overrides) -> Path:
    model = tiny_model(seed, vocab_size=V, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    save_model(model, tmp_path / name, tokenizer=tok_dir / "tokenizer.model",
               sections={"source": {"note": "made by test_gguf"}})
    return tmp_path / name


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def logits(model_dir: Path) -> torch.Tensor:
    model, _ = load_model(model_dir, quant_backend="dequantize")
    x = torch.arange(24).reshape(2, 12) * 7 % V
    with torch.no_grad():
        return model(x)


def assert_same_model(a: Path, b: Path) -> None:
    """Tensors bit for bit (dtype included), tokenizer.model byte for byte, config.json equal but for the source
    section, and the same logits."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert list(ta) == list(tb) or set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    ca, cb = read_json(a / "config.json"), read_json(b / "config.json")
    assert {k: v for k, v in ca.items() if k != "source"} == {k: v for k, v in cb.items() if k != "source"}
    assert torch.equal(logits(a), logits(b))


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_float_round_trip_is_identical(name, tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, **MODELS[name])
    r = export_gguf(src, tmp_path / "m.gguf")
    assert r["file_type"] == "F32" and r["types"] == {"F32": r["tensors"]} and r["tokenizer"] is True
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert back["model"] == read_json(src / "config.json")["model"] and back["dtype"] == "float32"
    assert_same_model(src, tmp_path / "back")
    source = read_json(tmp_path / "back" / "config.json")["source"]
    assert source["gguf_architecture"] == r["architecture"] and source["version"] == "0.1.0"
    assert source["source_sha256"] == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_round_trip_keeps_bf16_matrices_and_f32_vectors(family, tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, family=family, dtype=torch.bfloat16, dropout=0.1)
    r = export_gguf(src, tmp_path / "m.gguf")
    assert r["file_type"] == "BF16" and set(r["types"]) == {"BF16", "F32"}
    reader, _ = read_gguf(tmp_path / "m.gguf")
    for t in reader.tensors:
        assert t.tensor_type.name == ("BF16" if len(t.shape) == 2 else "F32"), t.name
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert_same_model(src, tmp_path / "back")  # dropout 0.1 comes back through lbdl.dropout


def test_weights_dtype_converts_float_matrices(tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, family="llama")
    r = export_gguf(src, tmp_path / "m.gguf", dtype="bfloat16")
    assert r["file_type"] == "BF16"
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert back["dtype"] == "bfloat16"
    model, _ = load_model(tmp_path / "back")
    original, _ = load_model(src)
    assert torch.equal(model.blocks[0].attn.q_proj.weight, original.blocks[0].attn.q_proj.weight.bfloat16())
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "f32", dtype="float32")
    assert back["dtype"] == "float32"


QUANTIZED = [("gpt2", t, "pure") for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")] + \
            [("llama", t, "m") for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")] + \
            [("llama-256", "q4_k", "m"), ("llama-256", "q5_k", "s"), ("llama-256", "q4_k", "pure")]
FILE_TYPES = {("q4_k", "m"): "Q4_K_M", ("q5_k", "s"): "Q5_K_S", ("q4_k", "pure"): "Q4_K_S"}


@pytest.mark.parametrize("family, qtype, recipe", QUANTIZED, ids=lambda v: str(v))
def test_quantized_round_trip_keeps_the_blocks(family, qtype, recipe, tok_dir, tmp_path):
    overrides = dict(family="llama", n_embd=256, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=512) \
        if family == "llama-256" else dict(family=family)
    src = make(tmp_path, tok_dir, "f", **overrides)
    quantize_dir(src, tmp_path / "q", QuantizeConfig(type=qtype, recipe=recipe))
    r = export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    assert r["file_type"] == FILE_TYPES.get((qtype, recipe), qtype.upper())
    assert qtype.upper() in r["types"]
    back = import_gguf(tmp_path / "q.gguf", tmp_path / "back")
    assert back["quantized"] == {t: list(read_json(tmp_path / "q" / "config.json")["quantization"]["tensors"].values())
                                 .count(t) for t in back["quantized"]} and back["dequantized"] == []
    assert_same_model(tmp_path / "q", tmp_path / "back")


def test_a_quantized_file_without_lbdls_section_gets_one_made(tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, "f", family="llama")
    quantize_dir(src, tmp_path / "q", QuantizeConfig(type="q4_0"))
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    rewrite(tmp_path / "q.gguf", tmp_path / "plain.gguf", drop=("lbdl.quantization",))
    import_gguf(tmp_path / "plain.gguf", tmp_path / "back")
    want = read_json(tmp_path / "q" / "config.json")["quantization"]
    got = read_json(tmp_path / "back" / "config.json")["quantization"]
    assert got["tensors"] == want["tensors"] and got["type"] == "q4_0" and got["name"] == "Q4_0"
    assert got["bits_per_weight"] == want["bits_per_weight"]
    assert torch.equal(logits(tmp_path / "q"), logits(tmp_path / "back"))


# --- the file as gguf reads it ------------------------------------------------------------------------------


def allowed_names(arch: str, n_layer: int) -> set[str]:
    """Every tensor name gguf-py's constants allow for an architecture (weight and bias of each)."""
    a = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = set()
    for t in gguf.MODEL_TENSORS[a]:
        for i in range(n_layer):
            base = gguf.TENSOR_NAMES[t].format(bid=i)
            names |= {f"{base}.weight", f"{base}.bias"}
    return names


@pytest.mark.parametrize("name", list(MODELS))
def test_metadata_and_tensor_names_read_back_with_gguf(name, tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, "my-model", **MODELS[name])
    cfg = read_json(src / "config.json")["model"]
    r = export_gguf(src, tmp_path / "m.gguf")
    arch = "llama" if cfg["mlp"] == "swiglu" else "gpt2"
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: field_value(v) for k, v in reader.fields.items()}
    assert f["general.architecture"] == arch == r["architecture"] and f["general.name"] == "my-model"
    expect = {"context_length": cfg["block_size"], "embedding_length": cfg["n_embd"], "block_count": cfg["n_layer"],
              "feed_forward_length": cfg["intermediate_size"], "attention.head_count": cfg["n_head"],
              "vocab_size": V}
    if arch == "llama":
        expect |= {"attention.head_count_kv": cfg["n_kv_head"], "rope.dimension_count": cfg["n_embd"] // cfg["n_head"]}
        assert f["llama.rope.freq_base"] == cfg["rope_theta"]
        assert math.isclose(f["llama.attention.layer_norm_rms_epsilon"], cfg["norm_eps"], rel_tol=1e-6)
    else:
        assert math.isclose(f["gpt2.attention.layer_norm_epsilon"], cfg["norm_eps"], rel_tol=1e-6)
    for key, value in expect.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32 and f["general.quantization_version"] == 2
    assert f["lbdl.version"] == "0.1.0"
    names = [t.name for t in reader.tensors]
    assert set(names) <= allowed_names(arch, cfg["n_layer"]) and len(names) == len(set(names)) == r["tensors"]
    assert ("output.weight" in names) == (not cfg["tie_embeddings"])
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order: ne0 (the row) first
    assert shapes["token_embd.weight"] == (cfg["n_embd"], V)
    kv = cfg["n_kv_head"] * cfg["n_embd"] // cfg["n_head"]
    if arch == "gpt2":
        assert shapes["blk.1.attn_qkv.weight"] == (cfg["n_embd"], cfg["n_embd"] + 2 * kv)
        assert shapes["position_embd.weight"] == (cfg["n_embd"], cfg["block_size"])
    else:
        assert shapes["blk.1.attn_k.weight"] == (cfg["n_embd"], kv)
        assert shapes["blk.0.ffn_gate.weight"] == (cfg["n_embd"], cfg["intermediate_size"])
        assert ("blk.0.attn_q.bias" in names) == cfg["bias"]


def test_the_vocabulary_read_back_is_the_sentencepiece_models(tok_dir, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    src = make(tmp_path, tok_dir)
    export_gguf(src, tmp_path / "m.gguf")
    proto = pb.ModelProto()
    proto.ParseFromString((tok_dir / "tokenizer.model").read_bytes())
    f = {k: field_value(v) for k, v in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [p.piece for p in proto.pieces]
    assert f["tokenizer.ggml.scores"] == [p.score for p in proto.pieces]  # float32 both
    assert f["tokenizer.ggml.token_type"] == [int(p.type) for p in proto.pieces]
    types = f["tokenizer.ggml.token_type"]
    tok = Tokenizer.load(tok_dir)
    assert types[tok.unk_id] == gguf.TokenType.UNKNOWN and types[tok.bos_id] == gguf.TokenType.CONTROL
    assert types[tok.piece_to_id(SEP)] == gguf.TokenType.CONTROL
    assert types[tok.piece_to_id("\n")] == gguf.TokenType.USER_DEFINED
    assert types.count(gguf.TokenType.BYTE) == 256 and types[tok.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id)
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is False and f["tokenizer.ggml.remove_extra_whitespaces"] is False


def test_the_rebuilt_tokenizer_encodes_as_lbdls(tok_dir, tmp_path):
    """With lbdl's spec (byte for byte) and without it (a converter's file: llama.cpp's defaults read from the
    keys): the same ids for the tokenizer's round-trip strings."""
    src = make(tmp_path, tok_dir)
    export_gguf(src, tmp_path / "m.gguf")
    _, fields = read_gguf(tmp_path / "m.gguf")
    rebuilt = read_vocab(fields, "m.gguf")
    assert rebuilt == (tok_dir / "tokenizer.model").read_bytes()
    plain = read_vocab({k: v for k, v in fields.items() if k != "lbdl.tokenizer.spec"}, "m.gguf")
    assert plain != rebuilt
    tok, other = Tokenizer.load(tok_dir), Tokenizer(plain)
    for text in KNOWN + [SEP, f"a{SEP}b  c\n\n  d 123 4.5"]:
        assert other.encode(text) == tok.encode(text), repr(text[:40])
        assert other.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


# --- llama.cpp's layout ------------------------------------------------------------------------------------


def ggml_rope_norm(x: torch.Tensor, theta: float) -> torch.Tensor:
    """ggml_rope_ext's mode 0 (LLAMA_ROPE_TYPE_NORM, the `llama` architecture's), written from ggml-cpu's
    rope_f32: x (T, D); the pair (2j, 2j+1) at position p turns by p * theta^(-2j/D)."""
    T, D = x.shape
    out = x.clone()
    for p in range(T):
        for i0 in range(0, D, 2):
            a = p * theta ** (-i0 / D)
            x0, x1 = x[p, i0], x[p, i0 + 1]
            out[p, i0], out[p, i0 + 1] = x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a)
    return out


def test_permuted_q_and_k_give_llama_cpp_the_same_attention_scores():
    torch.manual_seed(0)
    H, Hkv, D, C, T, theta = 4, 2, 8, 32, 6, 10000.0
    wq, wk, x = torch.randn(H * D, C), torch.randn(Hkv * D, C), torch.randn(T, C)
    cos, sin = rope_tables(D, T, theta)
    lbdl = [apply_rope((x @ w.t()).view(T, -1, D).transpose(0, 1), cos, sin) for w in (wq, wk)]  # (heads, T, D)
    gq, gk = to_ggml_rope(wq, H), to_ggml_rope(wk, Hkv)
    ggml = [torch.stack([ggml_rope_norm((x @ w.t()).view(T, -1, D)[:, h], theta) for h in range(n)])
            for w, n in ((gq, H), (gk, Hkv))]
    for h in range(H):  # head h reads kv head h // (H / Hkv) in both
        want = lbdl[0][h] @ lbdl[1][h // 2].t()
        got = ggml[0][h] @ ggml[1][h // 2].t()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(from_ggml_rope(gq, H), wq) and torch.equal(from_ggml_rope(gk, Hkv), wk)


def test_quantized_q_rows_are_moved_whole_and_read_by_gguf(tok_dir, tmp_path):
    from quant.formats import dequantize

    src = make(tmp_path, tok_dir, "f", family="llama")
    quantize_dir(src, tmp_path / "q", QuantizeConfig(type="q4_0"))
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    from safetensors.torch import load_file

    packed = load_file(tmp_path / "q" / "model.safetensors")
    file = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    q = torch.from_numpy(file["blk.0.attn_q.weight"].data.copy())
    assert torch.equal(q, to_ggml_rope(packed["blocks.0.attn.q_proj.weight"], 4))
    v = file["blk.1.attn_v.weight"]
    assert torch.equal(torch.from_numpy(v.data.copy()), packed["blocks.1.attn.v_proj.weight"])
    floats = gguf.quants.dequantize(v.data, v.tensor_type)
    assert torch.equal(torch.from_numpy(floats), dequantize(packed["blocks.1.attn.v_proj.weight"], "q4_0"))


# --- files written as llama.cpp's converter writes them ------------------------------------------------------------


def converter_file(hf, arch: str, path: Path) -> None:
    """A GGUF of a transformers model as convert_hf_to_gguf.py writes it: F16 matrices, F32 vectors, GPT-2's Conv1D
    transposed, Llama's q/k permuted with the converter's own formula, its metadata keys; no tokenizer."""
    cfg = hf.config
    w = gguf.GGUFWriter(path, arch)
    w.add_name("hf-model")
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    def permute(weights, n_head, n_head_kv):  # convert_hf_to_gguf.py LlamaModel.permute
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    names = {"gpt2": {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "ln_1": "attn_norm",
                      "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up",
                      "mlp.c_proj": "ffn_down"},
             "llama": {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
                       "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                       "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                       "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}}[arch]
    for name, t in hf.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        parts = name.removeprefix("transformer.").removeprefix("model.").split(".")
        if parts[0] == "lm_head":
            out = "output." + parts[-1]
        elif parts[0] in ("h", "layers"):
            out = f"blk.{parts[1]}.{names['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            out = f"{names['.'.join(parts[:-1])]}.{parts[-1]}"
        if arch == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            t = permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        t = t.contiguous().numpy()
        w.add_tensor(out, t.astype("float16") if t.ndim == 2 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_converter_style_file_runs_as_transformers_does(arch, tmp_path):
    hf = random_hf_model(arch)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and "weight" in name else 0.0))
            if p.dim() == 2:
                p.copy_(p.half().float())  # what an F16 file holds
    hf.eval()
    converter_file(hf, arch, tmp_path / "hf.gguf")
    r = import_gguf(tmp_path / "hf.gguf", tmp_path / "m")
    assert r["tokenizer"] is False and r["dtype"] == "float32"
    model, _ = load_model(tmp_path / "m")
    x = torch.randint(0, 113, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)


def test_types_lbdl_has_no_blocks_for_need_dequantize(tok_dir, tmp_path, cli):
    """A Q6_K tensor (llama.cpp's Q4_K_M gives output and some ffn_down Q6_K): refused naming the type and the
    flag; with --dequantize it comes in as gguf's dequantizer reads it, the other blocks kept."""
    import numpy as np

    src = make(tmp_path, tok_dir, "f", family="llama", n_embd=256, n_layer=1, intermediate_size=512)
    quantize_dir(src, tmp_path / "q", QuantizeConfig(type="q4_k"))
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(128, 210), dtype=np.uint8)  # 128 rows of one Q6_K block: ql[128] qh[64]
    blocks[:, 208:] = np.full((128, 1), 0.001, dtype=np.float16).view(np.uint8)  # scales[16], d (fp16)
    rewrite(tmp_path / "q.gguf", tmp_path / "q6.gguf", drop=("lbdl.quantization",),
            replace={"blk.0.attn_v.weight": (blocks, gguf.GGMLQuantizationType.Q6_K)})
    r = cli("import", tmp_path / "q6.gguf", "--out", tmp_path / "no")
    assert r.code == 2 and "Q6_K" in r.err and "--dequantize" in r.err and not (tmp_path / "no").exists()
    r = cli("import", tmp_path / "q6.gguf", "--out", tmp_path / "yes", "--dequantize", "--json")
    assert r.code == 0, r.err
    assert r.json()["dequantized"] == ["blk.0.attn_v.weight"] and r.json()["quantized"]["q4_k"] > 0
    model, config = load_model(tmp_path / "yes")
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K)
    assert torch.equal(model.blocks[0].attn.v_proj.weight, torch.from_numpy(want))
    assert "blocks.0.attn.v_proj.weight" not in config["quantization"]["tensors"]


def rewrite(src: Path, dst: Path, drop=(), arch=None, add=None, replace=None) -> None:
    """A copy of a GGUF file with keys dropped or added, another architecture, tensors replaced by (data, type)."""
    reader = gguf.GGUFReader(src)
    old_arch = field_value(reader.fields["general.architecture"])
    w = gguf.GGUFWriter(dst, arch or old_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in drop or key == "general.architecture":
            continue
        value = field_value(field)
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace(f"{old_arch}.", f"{arch}.") if arch else key, value, field.types[0], sub_type=sub)
    for key, (value, kind) in (add or {}).items():
        w.add_key_value(key, value, kind)
    for t in reader.tensors:
        data, kind = (replace or {}).get(t.name, (t.data, t.tensor_type))
        w.add_tensor(t.name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- bad input -----------------------------------------------------------------------------------------------


def test_nf4_export_is_refused_naming_the_closest_types(tok_dir, tmp_path, cli):
    src = make(tmp_path, tok_dir, "f")
    quantize_dir(src, tmp_path / "nf4", QuantizeConfig(type="nf4", embeddings="keep"))
    r = cli("export", tmp_path / "nf4", "--to", "gguf", "--out", tmp_path / "x.gguf")
    assert r.code == 2 and "nf4" in r.err and "q4_k" in r.err and "q4_0" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_gpt2_qkv_of_different_types_is_refused(tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, "f")
    quantize_dir(src, tmp_path / "q", QuantizeConfig(type="q4_0", recipe="s"))  # attention V gets q5_0
    with pytest.raises(CheckpointError, match="attn_qkv.*--recipe pure"):
        export_gguf(tmp_path / "q", tmp_path / "x.gguf")


def test_a_model_that_fits_no_gguf_architecture_is_refused(tok_dir, tmp_path):
    src = make(tmp_path, tok_dir, "f", positions="rope")  # GPT-2 otherwise
    with pytest.raises(CheckpointError, match="fits no GGUF architecture.*positions='rope'"):
        export_gguf(src, tmp_path / "x.gguf")


def test_an_unknown_architecture_is_refused_by_name(tok_dir, tmp_path, cli):
    export_gguf(make(tmp_path, tok_dir, family="llama"), tmp_path / "m.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "falcon.gguf", arch="falcon")
    r = cli("import", tmp_path / "falcon.gguf", "--out", tmp_path / "x")
    assert r.code == 2 and "'falcon'" in r.err and "gpt2 and llama" in r.err and not (tmp_path / "x").exists()


def test_a_gpt2_bpe_vocabulary_is_refused(tok_dir, tmp_path, cli):
    export_gguf(make(tmp_path, tok_dir), tmp_path / "m.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "bpe.gguf", drop=("tokenizer.ggml.model",),
            add={"tokenizer.ggml.model": ("gpt2", gguf.GGUFValueType.STRING)})
    r = cli("import", tmp_path / "bpe.gguf", "--out", tmp_path / "x")
    assert r.code == 2 and "GPT-2 byte-level BPE" in r.err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("content, words", [(b"not a gguf file at all\n", "not a GGUF file"),
                                            (b"GGUF\x03\x00\x00\x00\xff", "damaged or truncated")])
def test_a_file_that_is_not_gguf_is_refused(content, words, tmp_path, cli):
    (tmp_path / "bad.gguf").write_bytes(content)
    r = cli("import", tmp_path / "bad.gguf", "--out", tmp_path / "x")
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_truncated_export_is_refused(tok_dir, tmp_path, cli):
    export_gguf(make(tmp_path, tok_dir), tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    r = cli("import", tmp_path / "cut.gguf", "--out", tmp_path / "x")
    assert r.code == 2 and "damaged or truncated" in r.err and not (tmp_path / "x").exists()


def test_outputs_that_exist_need_force(tok_dir, tmp_path, cli):
    src = make(tmp_path, tok_dir)
    (tmp_path / "m.gguf").write_bytes(b"keep me")
    r = cli("export", src, "--to", "gguf", "--out", tmp_path / "m.gguf")
    assert r.code == 2 and "already exists" in r.err and (tmp_path / "m.gguf").read_bytes() == b"keep me"
    r = cli("export", src, "--to", "gguf", "--out", tmp_path / "m.gguf", "--force", "--json")
    assert r.code == 0 and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    (tmp_path / "out").mkdir()
    r = cli("import", tmp_path / "m.gguf", "--out", tmp_path / "out")
    assert r.code == 2 and "already exists" in r.err and not any((tmp_path / "out").iterdir())
    r = cli("import", tmp_path / "m.gguf", "--out", tmp_path / "out", "--force", "--json")
    assert r.code == 0 and r.json()["architecture"] == "gpt2" and (tmp_path / "out" / "tokenizer.model").is_file()
    r = cli("import", tmp_path / "m.gguf", "--out", tmp_path / "m.gguf", "--force")
    assert r.code == 2 and "is the input" in r.err


def test_dequantize_is_for_gguf_files_only(tmp_path, cli):
    (tmp_path / "hf").mkdir()
    r = cli("import", tmp_path / "hf", "--out", tmp_path / "x", "--dequantize")
    assert r.code == 2 and "--dequantize applies to a GGUF file" in r.err


def test_without_the_gguf_package_the_error_names_the_extra(tok_dir, tmp_path, cli, monkeypatch):
    import sys

    src = make(tmp_path, tok_dir)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    r = cli("export", src, "--to", "gguf", "--out", tmp_path / "x.gguf")
    assert r.code == 2 and "pip install 'lbdl[gguf]'" in r.err and not (tmp_path / "x.gguf").exists()


# --- parity with llama.cpp (llama-cpp-python), when it is installed -------------------------------------------------

# max |logit difference| / max |logit|. Float: the same float32 arithmetic in another order (measured: under 0.1%).
# Quantized: llama.cpp also quantizes the activations to 8 bits for its block dot products, where lbdl multiplies
# float activations by the dequantized weights (measured: up to 2.5% on this model, Q8_0 and Q4_0 alike).
LLAMA_CPP_TOLERANCE = {"F32": 0.002, "Q8_0": 0.05, "Q4_0": 0.05}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                   "llama-cpp-python builds llama.cpp from source, ~10 min)")


def peaked(tmp_path, tok_dir, family, qtype=None) -> Path:
    """A model whose predictions are not flat (its weights scaled up): most positions have a clear best token."""
    model = tiny_model(3, family=family, vocab_size=V, n_embd=64, block_size=64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    save_model(model, tmp_path / "p", tokenizer=tok_dir / "tokenizer.model")
    if qtype is None:
        return tmp_path / "p"
    quantize_dir(tmp_path / "p", tmp_path / qtype, QuantizeConfig(type=qtype))
    return tmp_path / qtype


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("qtype", [None, "q8_0", "q4_0"])
def test_llama_cpp_logits_and_greedy_tokens_match(llama_cpp, family, qtype, tok_dir, tmp_path):
    """Float: the same logits and the same 32 greedy tokens, one at a time on both sides (llama.cpp's KV cache).
    Quantized: lbdl's 32 greedy tokens read back by llama.cpp in one pass give the same logits within the
    tolerance and the same argmax wherever lbdl's best token leads the next by more than twice the largest
    difference seen (a closer race may go either way; most positions must qualify)."""
    import numpy as np

    src = peaked(tmp_path, tok_dir, family, qtype)
    export_gguf(src, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    model, _ = load_model(src, quant_backend="dequantize")
    prompt = Tokenizer.load(tok_dir).encode("First Citizen:\nSpeak")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        ours = model(torch.tensor([ids]))[0].float().numpy()
    llm.reset()
    if qtype is None:
        llm.eval(prompt)
        theirs_ids = []
        for _ in range(32):
            theirs_ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs_ids[-1]])
        assert theirs_ids == ids[len(prompt):]
    else:
        llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    diff = np.abs(theirs - ours).max()
    assert diff <= LLAMA_CPP_TOLERANCE[(qtype or "f32").upper()] * float(np.abs(ours).max())
    top2 = np.sort(ours, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * diff
    assert clear.mean() > 0.5
    assert (theirs.argmax(1) == ours.argmax(1))[clear].all()


def test_llama_cpp_tokenizes_as_lbdl(llama_cpp, tok_dir, tmp_path):
    """Strings without a literal U+2581: llama.cpp's SPM tokenizer turns it into a space before tokenizing, where
    lbdl spells it in bytes (tokenizer/core.py), so those differ by design."""
    export_gguf(make(tmp_path, tok_dir), tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    tok = Tokenizer.load(tok_dir)
    for text in [t for t in KNOWN if "\u2581" not in t and t]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), repr(text[:40])
