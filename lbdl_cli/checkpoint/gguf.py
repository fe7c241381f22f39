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

import hashlib
import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_dir, atomic_file, check_out
from ..errors import CheckpointError, ConfigError
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
    write_model,
)
from .directory import _quantized_types
from .gguf_vocab import read_vocab, write_vocab
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# --- import ------------------------------------------------------------------------------------


def read_gguf(path: Path):
    """(reader, {key: value}) of a GGUF file; anything else refused in one line."""
    gguf = require_gguf()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf file or a "
                              f"Hugging Face directory")
    try:
        reader = gguf.GGUFReader(path)
        fields = {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # numpy and gguf raise many kinds on a cut or damaged file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is a damaged or truncated GGUF file ({why}); export or download it "
                              f"again") from None
    return reader, fields


def field_value(field):
    """A GGUFReader field as a Python value: a str, a number, a bool or a list of them."""
    from gguf import GGUFValueType

    def item(i, kind):
        return str(bytes(field.parts[i]), "utf-8") if kind == GGUFValueType.STRING else field.parts[i].tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [item(i, field.types[-1]) for i in field.data]
    return item(field.data[0], field.types[0])


def _float32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    import numpy as np

    return float(str(np.float32(x)))


def gguf_config(arch: str, fields: dict, tensors: dict, where) -> ModelConfig:
    """The model config of a gpt2 or llama GGUF file's metadata; what lbdl cannot run refused by name."""
    def key(name, default=KeyError):
        value = fields.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise CheckpointError(f"{where} lacks the key {arch}.{name} that a {arch} model needs")
        if isinstance(value, list):
            raise CheckpointError(f"{where}: {arch}.{name} differs per layer, which lbdl does not support")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{where} has no token_embd.weight; the file is incomplete")
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = n_embd // n_head if n_head else 0
    if arch == "gpt2":
        extra = dict(mlp="gelu", norm="layernorm", positions="learned", bias=True,
                     norm_eps=_float32(key("attention.layer_norm_epsilon")))
    else:
        for name, ok in (("expert_count", 0), ("rope.dimension_count", head_dim), ("attention.key_length", head_dim),
                         ("attention.value_length", head_dim)):
            if key(name, ok) != ok:
                raise CheckpointError(f"{where}: {arch}.{name} = {key(name)} is not supported (lbdl needs {ok})")
        scaling = key("rope.scaling.type", "none")
        if scaling != "none" or "rope_freqs.weight" in tensors:
            how = scaling if scaling != "none" else "rope_freqs.weight"
            raise CheckpointError(f"{where} scales its rotary positions ({how}); lbdl implements the default rotary "
                                  f"positions only")
        biases = [f"blk.0.{g}.bias" in tensors for g in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                         "ffn_up", "ffn_down")]
        if any(biases) != all(biases):
            raise CheckpointError(f"{where} has biases on some linear layers only; lbdl supports biases on all of "
                                  f"them or none")
        extra = dict(mlp="swiglu", norm="rmsnorm", positions="rope", bias=all(biases),
                     rope_theta=_float32(key("rope.freq_base", 10000.0)),
                     norm_eps=_float32(key("attention.layer_norm_rms_epsilon")))
    try:
        return ModelConfig(vocab_size=int(tensors["token_embd.weight"].shape[1]),
                           block_size=int(key("context_length")), n_layer=int(key("block_count")), n_head=n_head,
                           n_kv_head=int(key("attention.head_count_kv", n_head)), n_embd=n_embd,
                           intermediate_size=int(key("feed_forward_length")),
                           tie_embeddings="output.weight" not in tensors,
                           dropout=_float32(fields.get("lbdl.dropout", 0.0)), **extra)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _read_tensor(gguf, t, lbdl_names: tuple, dequantize: bool, where):
    """(torch tensor, lbdl quantization type or None, dequantized?) of one GGUF tensor."""
    import numpy as np

    from quant.formats import FORMATS
    from quant.recipe import role

    Q = gguf.GGMLQuantizationType
    kind = Q(t.tensor_type)
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data, dtype=np.float32)), None, False
    if kind == Q.BF16:
        return torch.from_numpy(np.array(t.data)).view(torch.bfloat16), None, False
    lbdl_type = next((f.name for f in FORMATS.values() if f.ggml_type == int(kind)), None)
    if lbdl_type is not None and all(role(n) for n in lbdl_names):
        return torch.from_numpy(np.array(t.data)), lbdl_type, False
    if not dequantize:
        why = (f"lbdl keeps {lbdl_names[0]} in full precision" if lbdl_type else
               f"lbdl has no {kind.name} blocks (it keeps {', '.join(f.upper() for f in FILE_TYPES)} as they are)")
        raise CheckpointError(f"{where}: tensor {t.name} is {kind.name} and {why}; add --dequantize to import it as "
                              f"floats")
    try:
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, kind), dtype=np.float32)), None, True
    except NotImplementedError:
        raise CheckpointError(f"{where}: tensor {t.name} is {kind.name}, which neither lbdl nor the gguf package "
                              f"can dequantize") from None


def _quant_section(fields: dict, state: dict, qtypes: dict[str, str], where: Path) -> dict:
    """The file's own lbdl quantization section when it describes these tensors, else one made from them."""
    from quant.formats import FORMATS
    from quant.recipe import summarize

    try:
        section = json.loads(fields.get("lbdl.quantization", "null"))
    except ValueError:
        section = None
    if isinstance(section, dict) and section.get("tensors") == qtypes:
        return section
    shapes = {k: (*v.shape[:-1], FORMATS[qtypes[k]].k_from_row_bytes(v.shape[-1])) if k in qtypes else tuple(v.shape)
              for k, v in state.items()}
    stats = summarize(shapes, {k: v.element_size() for k, v in state.items()}, qtypes)
    counts = {}
    for name, t in qtypes.items():
        if not name.startswith(("tok_emb", "lm_head")):
            counts[t] = counts.get(t, 0) + 1
    main = max(counts or {t: 1 for t in qtypes.values()}, key=lambda t: counts.get(t, 0))
    ft = fields.get("general.file_type")
    name = main.upper()
    if ft is not None and int(ft) in {int(v) for v in require_gguf().LlamaFileType}:
        name = require_gguf().LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    return {"name": name, "type": main, "bits_per_weight": round(stats["bits_per_weight"], 4),
            "quantized_bits_per_weight": round(stats["quantized_bits_per_weight"], 4), "layout": LAYOUT,
            "tensors": dict(qtypes), "source": str(where)}


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | str | None = None,
                dequantize: bool = False, force: bool = False) -> dict:
    """Convert a gpt2 or llama GGUF file (lbdl's or llama.cpp's converter's) into an lbdl model directory: lbdl's
    block types stay packed, others need `dequantize`; a `llama` vocabulary becomes tokenizer.model."""
    gguf = require_gguf()
    check_out(out, force, inputs=(path,))
    path = Path(path)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    reader, fields = read_gguf(path)
    arch = fields.get("general.architecture")
    if arch not in ARCHES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; lbdl imports {' and '.join(ARCHES)} "
                              f"GGUF files")
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(arch, fields, tensors, path)
    state, qtypes, dequantized, used, stored = {}, {}, [], set(), set()
    for name, names, rope in _expand(ARCHES[arch]["table"], cfg.n_layer):
        if name not in tensors:
            continue  # an absent tensor is named by the shape check below
        used.add(name)
        t, qtype, was_dequantized = _read_tensor(gguf, tensors[name], names, dequantize, path)
        if qtype is None and not was_dequantized and t.dim() >= 2:
            stored.add(t.dtype)
        if was_dequantized:
            dequantized.append(name)
        if rope:
            t = from_ggml_rope(t, cfg.n_head if rope == "q" else cfg.n_kv_head)
        kv = cfg.n_kv_head * cfg.head_dim
        sizes = [t.shape[0]] if len(names) == 1 else [t.shape[0] - 2 * kv, kv, kv]
        for n, part in zip(names, t.split(sizes, dim=0)):
            state[n] = part.contiguous()
            if qtype is not None:
                qtypes[n] = qtype
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unknown[:3])} for a {arch} model lbdl can "
                              f"run")
    check_tensors(expected_shapes(cfg, qtypes), {k: tuple(v.shape) for k, v in state.items()}, path)
    if dtype is None:  # as stored: bfloat16 when the file's float matrices are, else float32 (F16 too)
        dtype = torch.bfloat16 if stored == {torch.bfloat16} else torch.float32
    state = {k: v if k in qtypes else v.to(dtype) for k, v in state.items()}
    tokenizer = read_vocab(fields, path)
    if tokenizer is not None and len(fields["tokenizer.ggml.tokens"]) != cfg.vocab_size:
        raise CheckpointError(f"{path}: the vocabulary has {len(fields['tokenizer.ggml.tokens'])} tokens but "
                              f"token_embd.weight has {cfg.vocab_size} rows; the file does not hold one model")
    source = {"gguf_architecture": arch, "path": str(path.resolve()), "name": fields.get("general.name")}
    source.update({k: fields[f"lbdl.{k}"] for k in ("version", "source_sha256") if f"lbdl.{k}" in fields})
    sections = {"source": source}
    if qtypes:
        sections["quantization"] = _quant_section(fields, state, qtypes, path)
    del reader, tensors  # the file's mapping
    with atomic_dir(out, force=force, inputs=(path,)) as tmp:
        tok_file = tmp / ".tokenizer-from-gguf" if tokenizer is not None else None
        if tok_file is not None:
            tok_file.write_bytes(tokenizer)
        write_model(tmp, cfg, state, tok_file, sections)
        if tok_file is not None:
            tok_file.unlink()
    counts = {}
    for t in qtypes.values():
        counts[t] = counts.get(t, 0) + 1
    params = sum(_logical(v, qtypes[k]) if k in qtypes else v.numel() for k, v in state.items())
    return {"out": str(out), "architecture": arch, "params": params, "dtype": str(dtype).replace("torch.", ""),
            "model": cfg.to_dict(), "quantized": counts, "dequantized": dequantized, "tokenizer": tokenizer is not None}


def _logical(packed: torch.Tensor, qtype: str) -> int:
    from quant.formats import FORMATS

    return packed.numel() // packed.shape[-1] * FORMATS[qtype].k_from_row_bytes(packed.shape[-1])
