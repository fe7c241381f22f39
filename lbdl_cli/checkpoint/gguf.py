"""GGUF export and import (llama.cpp's one-file format) for the GPT-2 (`gpt2`) and Llama (`llama`) families.

Tensor names and layouts are those llama.cpp's own convert_hf_to_gguf.py writes. A table row is
(GGUF name, lbdl name(s), rope): `{i}` is the layer; several lbdl names are stacked along the rows into one
GGUF tensor (GPT-2's attn_qkv); `rope` marks Llama's q and k projections, whose rows llama.cpp wants in its
rotary layout: lbdl (as Hugging Face) rotates the two halves of each head, llama.cpp's `llama` architecture
rotates adjacent pairs, so row s*D/2 + j of a head goes to row 2j + s (the converter's `permute`), and back on
import. Rows move whole, so quantized rows move with their blocks untouched.

Floats go out as F32, or BF16 for matrices stored in bfloat16 (1-D tensors always F32, as the converter does);
quantized tensors keep lbdl's bytes, which are ggml's blocks, so the file holds exactly what `lbdl quantize`
made. The `gguf` package (ggml's own writer and reader) is an optional extra: `pip install 'lbdl[gguf]'`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_file, check_out
from ..errors import CheckpointError, ConfigError
from ..files import file_sha256
from ..model import GPT, ModelConfig
from . import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    check_tensors,
    model_config,
    model_tokenizer,
    open_safetensors,
    parse_dtype,
    read_config,
    weights_path,
)
from .directory import _quantized_types
from .gguf_vocab import write_vocab
from .hf import FAMILIES

EXTRA = "GGUF files need the gguf package: pip install 'lbdl[gguf]'"

GPT2_TABLE = [
    ("token_embd.weight", ("tok_emb.weight",), None),
    ("position_embd.weight", ("pos_emb.weight",), None),
    *[(f"blk.{{i}}.{g}.{w}", tuple(f"blocks.{{i}}.{n}.{w}" for n in ns), None) for g, ns in
      (("attn_norm", ("norm1",)), ("attn_qkv", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
       ("attn_output", ("attn.o_proj",)), ("ffn_norm", ("norm2",)), ("ffn_up", ("mlp.up_proj",)),
       ("ffn_down", ("mlp.down_proj",))) for w in ("weight", "bias")],
    ("output_norm.weight", ("norm_f.weight",), None),
    ("output_norm.bias", ("norm_f.bias",), None),
    ("output.weight", ("lm_head.weight",), None),
]

LLAMA_TABLE = [
    ("token_embd.weight", ("tok_emb.weight",), None),
    *[(f"blk.{{i}}.{g}.{w}", (f"blocks.{{i}}.{n}.{w}",), rope) for g, n, rope in
      (("attn_norm", "norm1", None), ("attn_q", "attn.q_proj", "q"), ("attn_k", "attn.k_proj", "k"),
       ("attn_v", "attn.v_proj", None), ("attn_output", "attn.o_proj", None), ("ffn_norm", "norm2", None),
       ("ffn_gate", "mlp.gate_proj", None), ("ffn_up", "mlp.up_proj", None), ("ffn_down", "mlp.down_proj", None))
      for w in ("weight", "bias")],
    ("output_norm.weight", ("norm_f.weight",), None),
    ("output.weight", ("lm_head.weight",), None),
]

ARCHES = {"gpt2": dict(table=GPT2_TABLE, family="GPT2LMHeadModel"),
          "llama": dict(table=LLAMA_TABLE, family="LlamaForCausalLM")}
# lbdl's quantized model -> llama.cpp's file type: the k-quant recipes that give more bits to attention V only
# (pure, s) are its _S, those that also widen the feed-forward (m, l) its _M
FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
              "q5_1": "MOSTLY_Q5_1", "q4_k": "MOSTLY_Q4_K_{}", "q5_k": "MOSTLY_Q5_K_{}"}
LAYOUT = "packed rows of ggml blocks as uint8 (lbdl quant/formats.py)"


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(EXTRA) from None
    return gguf


def _expand(table, n_layer: int):
    """The rows of a table for a model of n_layer layers, in the converter's order: the rows before the layers',
    then layer by layer, then the rest."""
    layer = [row for row in table if "{i}" in row[0]]
    first = table.index(layer[0])
    rows = [(row, None) for row in table[:first]] + [(row, i) for i in range(n_layer) for row in layer]
    for (name, names, rope), i in rows + [(row, None) for row in table[first + len(layer):]]:
        yield name.format(i=i), tuple(n.format(i=i) for n in names), rope


def to_ggml_rope(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (a weight, packed rows or a bias) from the halves layout to llama.cpp's pairs."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def from_ggml_rope(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_arch(cfg: ModelConfig, where) -> str:
    fits = {arch: FAMILIES[spec["family"]]["fits"](cfg) for arch, spec in ARCHES.items()}
    arch = next((a for a, wrong in fits.items() if not wrong), None)
    if arch is None:
        why = "; ".join(f"{a} needs to change {', '.join(w)}" for a, w in fits.items())
        raise CheckpointError(f"{where} fits no GGUF architecture lbdl exports ({why})")
    return arch


def expected_shapes(cfg: ModelConfig, qtypes: dict[str, str]) -> dict[str, tuple]:
    """Every tensor's stored shape: quantized weights as packed rows (..., row_bytes)."""
    from quant.formats import FORMATS

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    for name, t in qtypes.items():
        if name in shapes:
            shapes[name] = (*shapes[name][:-1], FORMATS[t].row_bytes(shapes[name][-1]))
    return shapes


# --- export ------------------------------------------------------------------------------------


def _tensor_data(gguf, t: torch.Tensor, qtype: str | None, dtype: torch.dtype | None):
    """(numpy array, GGML type) of one tensor as the file holds it."""
    from quant.formats import FORMATS

    if qtype is not None:
        return t.contiguous().numpy(), gguf.GGMLQuantizationType(FORMATS[qtype].ggml_type)
    target = dtype or t.dtype
    if t.dim() >= 2 and target == torch.bfloat16:
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    return t.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.F32


def _file_type(section: dict | None, types) -> str:
    if section:
        name = FILE_TYPES[section["type"]]
        return name.format("M" if section.get("recipe") in ("m", "l") else "S")
    return "MOSTLY_BF16" if any(t.name == "BF16" for t in types) else "ALL_F32"


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | str | None = None,
                force: bool = False) -> dict:
    """Write an lbdl model directory as one GGUF file llama.cpp runs (`dtype`: of the float matrices; None or
    "auto": as stored)."""
    gguf = require_gguf()
    check_out(out, force, inputs=(model_dir,), kind="file")
    model_dir = Path(model_dir)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    config = read_config(model_dir)
    cfg = model_config(config, model_dir / CONFIG_FILE)
    qtypes = _quantized_types(config, model_dir / CONFIG_FILE)
    nf4 = sorted(n for n, t in qtypes.items() if t.startswith("nf4"))
    if nf4:
        raise CheckpointError(f"{model_dir} is quantized with {qtypes[nf4[0]]} ({nf4[0]}), which has no ggml type "
                              f"llama.cpp could run; quantize the float model with q4_k or q4_0 (the closest ggml "
                              f"types) and export that")
    arch = gguf_arch(cfg, model_dir)
    tok = model_tokenizer(model_dir, config) if (model_dir / TOKENIZER_FILE).is_file() else None
    path = weights_path(model_dir)
    with open_safetensors(path) as f:
        check_tensors(expected_shapes(cfg, qtypes), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, path)
        state = {k: f.get_tensor(k) for k in f.keys()}
    tensors = []
    for name, names, rope in _expand(ARCHES[arch]["table"], cfg.n_layer):
        if names[0] not in state:
            continue  # biases of a bias-free Llama, the head of a tied model
        types = [qtypes.get(n) for n in names]
        if len(set(types)) > 1:
            raise CheckpointError(f"{model_dir}: {', '.join(names)} are one tensor in llama.cpp ({name}) but are "
                                  f"quantized as {', '.join(str(t) for t in types)}; quantize the float model with "
                                  f"--recipe pure for a GPT-2 family GGUF")
        t = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        if rope:
            t = to_ggml_rope(t, cfg.n_head if rope == "q" else cfg.n_kv_head)
        tensors.append((name, *_tensor_data(gguf, t, types[0], dtype)))
    section = config.get("quantization") if qtypes else None
    file_type = _file_type(section, [t for _, _, t in tensors])
    with atomic_file(out, force=force, inputs=(model_dir,)) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(model_dir.resolve().name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_head)
        if arch == "llama":
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
        else:
            w.add_layer_norm_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("lbdl.version", __version__)
        w.add_string("lbdl.source_sha256", file_sha256(path))
        w.add_float32("lbdl.dropout", cfg.dropout)
        if section:
            w.add_string("lbdl.quantization", json.dumps(section))
        if tok is not None:
            write_vocab(w, tok.model_bytes)
        for name, data, ggml_type in tensors:
            w.add_tensor(name, data, raw_dtype=ggml_type)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    types = {}
    for _, _, t in tensors:
        types[t.name] = types.get(t.name, 0) + 1
    return {"out": str(out), "architecture": arch, "name": model_dir.resolve().name, "tensors": len(tensors),
            "file_type": file_type.removeprefix("MOSTLY_").removeprefix("ALL_"), "types": types,
            "size_bytes": Path(out).stat().st_size, "tokenizer": tok is not None}
