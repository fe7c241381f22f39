"""GGUF import: a gpt2 or llama GGUF file (lbdl's or llama.cpp's converter's) -> an lbdl model directory.

The tables and the rotary permutation are gguf.py's (export); this module reads the file with gguf's reader,
maps its metadata to a ModelConfig (refusing by name what lbdl's model cannot run), keeps lbdl's block types
packed, dequantizes the others on request, and rebuilds tokenizer.model from the vocabulary (gguf_vocab.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_dir, check_out
from ..errors import CheckpointError, ConfigError
from ..model import ModelConfig
from . import check_tensors, parse_dtype, write_model
from .gguf import ARCHES, FILE_TYPES, LAYOUT, _expand, expected_shapes, from_ggml_rope, require_gguf
from .gguf_vocab import read_vocab


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
