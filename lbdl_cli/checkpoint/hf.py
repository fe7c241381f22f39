"""Hugging Face import and export for the GPT-2 and Llama families.

Each family is one declarative table of tensor names plus a config mapping.
A table row is (hf name, lbdl name(s), conv1d): `{i}` stands for the layer
index; several lbdl names split one fused HF tensor along its output
dimension (GPT-2's c_attn); conv1d marks GPT-2's Conv1D weights, stored
(in, out) instead of nn.Linear's (out, in).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tokenizer import Tokenizer
from tokenizer.hf import save_hf_tokenizer

from ..atomic import check_out
from ..errors import CheckpointError
from ..files import inside, read_json
from ..model import GPT, ModelConfig
from . import (
    CONFIG_FILE,
    PICKLE_FILES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    atomic_dir,
    check_tensors,
    load_model,
    model_tokenizer,
    open_safetensors,
    parse_dtype,
    save_tensors,
    write_json,
    write_model,
)

GPT2_TABLE = [
    ("transformer.wte.weight", ("tok_emb.weight",), False),
    ("transformer.wpe.weight", ("pos_emb.weight",), False),
    ("transformer.h.{i}.ln_1.weight", ("blocks.{i}.norm1.weight",), False),
    ("transformer.h.{i}.ln_1.bias", ("blocks.{i}.norm1.bias",), False),
    ("transformer.h.{i}.attn.c_attn.weight",
     ("blocks.{i}.attn.q_proj.weight", "blocks.{i}.attn.k_proj.weight", "blocks.{i}.attn.v_proj.weight"), True),
    ("transformer.h.{i}.attn.c_attn.bias",
     ("blocks.{i}.attn.q_proj.bias", "blocks.{i}.attn.k_proj.bias", "blocks.{i}.attn.v_proj.bias"), False),
    ("transformer.h.{i}.attn.c_proj.weight", ("blocks.{i}.attn.o_proj.weight",), True),
    ("transformer.h.{i}.attn.c_proj.bias", ("blocks.{i}.attn.o_proj.bias",), False),
    ("transformer.h.{i}.ln_2.weight", ("blocks.{i}.norm2.weight",), False),
    ("transformer.h.{i}.ln_2.bias", ("blocks.{i}.norm2.bias",), False),
    ("transformer.h.{i}.mlp.c_fc.weight", ("blocks.{i}.mlp.up_proj.weight",), True),
    ("transformer.h.{i}.mlp.c_fc.bias", ("blocks.{i}.mlp.up_proj.bias",), False),
    ("transformer.h.{i}.mlp.c_proj.weight", ("blocks.{i}.mlp.down_proj.weight",), True),
    ("transformer.h.{i}.mlp.c_proj.bias", ("blocks.{i}.mlp.down_proj.bias",), False),
    ("transformer.ln_f.weight", ("norm_f.weight",), False),
    ("transformer.ln_f.bias", ("norm_f.bias",), False),
    ("lm_head.weight", ("lm_head.weight",), False),
]

LLAMA_TABLE = [
    ("model.embed_tokens.weight", ("tok_emb.weight",), False),
    ("model.layers.{i}.input_layernorm.weight", ("blocks.{i}.norm1.weight",), False),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.{w}", (f"blocks.{{i}}.attn.{p}_proj.{w}",), False)
      for p in "qkvo" for w in ("weight", "bias")],
    ("model.layers.{i}.post_attention_layernorm.weight", ("blocks.{i}.norm2.weight",), False),
    *[(f"model.layers.{{i}}.mlp.{p}_proj.{w}", (f"blocks.{{i}}.mlp.{p}_proj.{w}",), False)
      for p in ("gate", "up", "down") for w in ("weight", "bias")],
    ("model.norm.weight", ("norm_f.weight",), False),
    ("lm_head.weight", ("lm_head.weight",), False),
]

# HF buffers that are not weights (older GPT-2 and Llama checkpoints store them)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# --- config mapping ---------------------------------------------------------------


def _gpt2_config(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"GPT-2 activation_function {act!r} is not supported; lbdl implements gelu_new (tanh "
                              f"GELU)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise CheckpointError(f"GPT-2 option {flag}=true is not supported by lbdl")
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
        mlp="gelu", norm="layernorm", positions="learned", bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("resid_pdrop", 0.0),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _llama_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"Llama hidden_act {hf['hidden_act']!r} is not supported; lbdl implements silu (SwiGLU)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for kind in (rope.get("rope_type"), scaling.get("rope_type", scaling.get("type"))):
        if kind not in (None, "default"):
            raise CheckpointError(f"Llama rope_type {kind!r} is not supported; lbdl implements the default rotary "
                                  f"positions")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    if head_dim * n_head != hf["hidden_size"]:
        raise CheckpointError(f"Llama head_dim {head_dim} x {n_head} heads != hidden_size {hf['hidden_size']}; not "
                              f"supported")
    if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        raise CheckpointError("Llama attention_bias and mlp_bias differ; lbdl supports biases on all linear layers "
                              "or none")
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm",
        positions="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        bias=bool(hf.get("attention_bias")), tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=hf.get("attention_dropout", 0.0), norm_eps=hf.get("rms_norm_eps", 1e-6),
    )


def _gpt2_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.intermediate_size, "activation_function": "gelu_new", "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _llama_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
    }


def _gpt2_fits(cfg: ModelConfig) -> list[str]:
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in
             (("mlp", "gelu"), ("norm", "layernorm"), ("positions", "learned"), ("bias", True)) if getattr(cfg, k) != v]
    if cfg.n_kv_head != cfg.n_head:
        wrong.append(f"n_kv_head={cfg.n_kv_head}")
    return wrong


def _llama_fits(cfg: ModelConfig) -> list[str]:
    return [f"{k}={getattr(cfg, k)!r}" for k, v in
            (("mlp", "swiglu"), ("norm", "rmsnorm"), ("positions", "rope")) if getattr(cfg, k) != v]


FAMILIES = {
    "GPT2LMHeadModel": dict(table=GPT2_TABLE, to_lbdl=_gpt2_config, to_hf=_gpt2_hf_config, fits=_gpt2_fits),
    "LlamaForCausalLM": dict(table=LLAMA_TABLE, to_lbdl=_llama_config, to_hf=_llama_hf_config, fits=_llama_fits),
}


# --- tensors --------------------------------------------------------------------------


def _expand(table, n_layer: int):
    for hf_name, names, conv1d in table:
        layers = range(n_layer) if "{i}" in hf_name else [None]
        for i in layers:
            yield hf_name.format(i=i), tuple(n.format(i=i) for n in names), conv1d


def _shards(index: Path) -> list[Path]:
    """The files a sharded checkpoint's index names, each inside the index's directory."""
    weight_map = read_json(index, "checkpoint index", error=CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"checkpoint index {index} has no weight_map table (tensor name -> shard file); "
                              f"save the model again with save_pretrained")
    entries = set()
    for name, entry in weight_map.items():
        if not isinstance(entry, str) or not entry:
            raise CheckpointError(f"checkpoint index {index}: weight_map entry {entry!r} (of {name}) is not a "
                                  f"file name")
        entries.add(entry)
    files = []
    for entry in sorted(entries):
        f = inside(index.parent, entry, f"{index} weight_map entry", CheckpointError)
        if not f.is_file():
            raise CheckpointError(f"{index} names shard {entry}, which is missing from {index.parent}")
        files.append(f)
    return files


def _read_hf_tensors(dir: Path) -> dict[str, torch.Tensor]:
    index = dir / "model.safetensors.index.json"
    if (dir / WEIGHTS_FILE).is_file():
        files = [dir / WEIGHTS_FILE]
    elif index.is_file():
        files = _shards(index)
    else:
        pickled = [p.name for p in dir.iterdir() if p.name in PICKLE_FILES or p.suffix == ".bin"]
        if pickled:
            raise CheckpointError(f"{dir} holds only {pickled[0]}; lbdl never loads pickle files: save the model "
                                  f"with safe_serialization=True")
        raise CheckpointError(f"{dir} has no {WEIGHTS_FILE} or model.safetensors.index.json")
    tensors = {}
    for f in files:
        with open_safetensors(f) as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors


def _hf_architecture(hf: dict, dir: Path) -> str:
    arch = (hf.get("architectures") or [None])[0]
    if arch is None:
        arch = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}.get(hf.get("model_type"))
    if arch not in FAMILIES:
        raise CheckpointError(
            f"{dir}: architecture {arch!r} is not supported; lbdl imports {', '.join(FAMILIES)}"
        )
    return arch


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | str | None = None,
              force: bool = False) -> dict:
    """Convert a Hugging Face GPT2LMHeadModel / LlamaForCausalLM directory into an lbdl model directory
    (`dtype`: None or "auto" keeps the stored precision, float16 excepted)."""
    check_out(out, force, inputs=(hf_dir,))
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    hf_dir = Path(hf_dir)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{hf_dir} has no {CONFIG_FILE}; expected a Hugging Face model directory")
    hf = read_json(hf_dir / CONFIG_FILE, "Hugging Face config", error=CheckpointError)
    arch = _hf_architecture(hf, hf_dir)
    family = FAMILIES[arch]
    try:
        cfg = family["to_lbdl"](hf)
    except KeyError as e:
        raise CheckpointError(f"{hf_dir / CONFIG_FILE} lacks the field {e.args[0]!r} that {arch} needs") from None
    tensors = _read_hf_tensors(hf_dir)
    if arch == "GPT2LMHeadModel" and not any(k.startswith("transformer.") for k in tensors):
        tensors = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the head is the embedding itself

    state, used = {}, set()
    for hf_name, names, conv1d in _expand(family["table"], cfg.n_layer):
        if hf_name not in tensors:
            continue  # absent optional tensors (biases, head) are caught by the shape check below
        t = tensors[hf_name]
        used.add(hf_name)
        if conv1d:
            t = t.t()
        for name, part in zip(names, t.chunk(len(names), dim=0)):
            state[name] = part.contiguous()
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise CheckpointError(f"{hf_dir}: unexpected tensor(s) {', '.join(unknown[:3])} for {arch}")

    with torch.device("meta"):
        model = GPT(cfg)
    check_tensors({k: tuple(v.shape) for k, v in model.state_dict().items()},
                  {k: tuple(v.shape) for k, v in state.items()}, hf_dir)
    stored = {t.dtype for t in state.values()}
    if dtype is None:  # keep the stored precision, but never float16 (slow on CPUs)
        dtype = torch.float32 if torch.float16 in stored else None
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    source = {"hf_architecture": arch, "path": str(hf_dir.resolve())}
    tokenizer = hf_dir / TOKENIZER_FILE
    with atomic_dir(out, force=force, inputs=(hf_dir,)) as tmp:
        write_model(tmp, cfg, state, tokenizer if tokenizer.is_file() else None, {"source": source})
    return {"out": str(out), "architecture": arch, "params": sum(t.numel() for t in state.values()),
            "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""), "model": cfg.to_dict()}


def _special_ids(tok: Tokenizer | None) -> dict:
    """The config's bos/eos/pad ids: the tokenizer's, or null without one (transformers would otherwise assume
    GPT-2's 50256, outside the vocabulary)."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tok is not None:
        for key, i in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)):
            ids[key] = i if i >= 0 else None
    return ids


def export_hf(model_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False,
              dtype: torch.dtype | str | None = None) -> dict:
    """Write an lbdl model as a transformers directory: config.json (with the tokenizer's bos/eos/pad ids),
    model.safetensors, and with the model's tokenizer: tokenizer.json, tokenizer_config.json and
    special_tokens_map.json (`AutoTokenizer` encodes and decodes as lbdl does) beside lbdl's tokenizer.model."""
    check_out(out, force, inputs=(model_dir,))
    model_dir = Path(model_dir)
    model, config = load_model(model_dir, dtype=dtype)
    if "quantization" in config:
        raise CheckpointError(f"{model_dir} is quantized; export the unquantized model (transformers cannot read "
                              f"lbdl's packed blocks)")
    cfg = model.config
    fits = {arch: fam["fits"](cfg) for arch, fam in FAMILIES.items()}
    arch = next((a for a, wrong in fits.items() if not wrong), None)
    if arch is None:
        why = "; ".join(f"{a} needs to change {', '.join(w)}" for a, w in fits.items())
        raise CheckpointError(f"{model_dir} fits no Hugging Face architecture lbdl exports ({why})")
    tok = model_tokenizer(model_dir, config) if (model_dir / TOKENIZER_FILE).is_file() else None
    family = FAMILIES[arch]
    state = model.state_dict()
    out_tensors = {}
    for hf_name, names, conv1d in _expand(family["table"], cfg.n_layer):
        if not all(n in state for n in names):
            continue
        t = torch.cat([state[n] for n in names], dim=0)
        out_tensors[hf_name] = (t.t() if conv1d else t).contiguous()
    hf_config = {**family["to_hf"](cfg), **_special_ids(tok)}
    hf_config["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    with atomic_dir(out, force=force, inputs=(model_dir,)) as tmp:
        save_tensors(out_tensors, tmp / WEIGHTS_FILE)
        write_json(tmp / CONFIG_FILE, hf_config)
        if tok is not None:
            shutil.copyfile(model_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            if tok.exact:  # a foreign sentencepiece model (an imported Llama's) keeps only its tokenizer.model
                save_hf_tokenizer(tok, tmp, model_max_length=cfg.block_size)
        files = sorted(p.name for p in tmp.iterdir())
    return {"out": str(out), "architecture": arch, "tensors": len(out_tensors), "files": files,
            "hf_tokenizer": tok is not None and tok.exact}
