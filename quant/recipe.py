"""Recipes: which tensor gets which format, and quantizing a model directory.

A recipe starts from one base type for every linear layer and may give
chosen tensors more bits, as llama.cpp's `_S/_M/_L` variants do (LBDL 8.2:
attention V and the feed-forward weights are the most sensitive):

    pure   every linear layer gets the base type
    s      attention V gets the next type up           (Q4_K_S-like)
    m      attention V and the feed-forward down projection (Q4_K_M-like)
    l      attention V and every feed-forward weight

"Next type up" keeps the family: q4_0 -> q5_0 -> q8_0, q4_1 -> q5_1 -> q8_0,
q4_k -> q5_k -> q8_0, nf4 -> q8_0. The token embeddings (and the tied head,
or an untied head) get `embeddings`: q8_0 by default (llama.cpp's choice for
an output tensor whose rows are not a multiple of 256), any type, "same" (the
base type) or "keep" (full precision). Learned position embeddings, norms
and biases stay in full precision. A tensor whose inner size is not a
multiple of its type's block size stays in full precision and is reported.

On disk a quantized model is an ordinary model directory: model.safetensors
holds each quantized weight under its usual name as a uint8 tensor of packed
rows (quant/formats.py: the ggml block bytes, what a GGUF file holds), the
other tensors as they were; config.json keeps format_version 1 and gains a
"quantization" section naming each quantized tensor's type, the recipe and
the bits per weight. Nothing is pickled.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .formats import FORMATS, QuantError, get_format

RECIPES = {
    "pure": "every linear layer gets the base type",
    "s": "attention V gets the next type up",
    "m": "attention V and the feed-forward down projection get the next type up",
    "l": "attention V and every feed-forward weight get the next type up",
}
MORE_BITS = {"pure": (), "s": ("attn_v",), "m": ("attn_v", "ffn_down"), "l": ("attn_v", "ffn_down", "ffn_up", "ffn_gate")}
STEP_UP = {"q4_0": "q5_0", "q5_0": "q8_0", "q4_1": "q5_1", "q5_1": "q8_0", "q4_k": "q5_k", "q5_k": "q8_0",
           "nf4": "q8_0", "nf4_dq": "q8_0", "q8_0": "q8_0"}
DEFAULT_EMBEDDINGS = "q8_0"
EMBEDDING_CHOICES = ("keep", "same")

ROLE_PATTERNS = (
    (re.compile(r"blocks\.\d+\.attn\.v_proj\.weight$"), "attn_v"),
    (re.compile(r"blocks\.\d+\.attn\.[qko]_proj\.weight$"), "attn"),
    (re.compile(r"blocks\.\d+\.mlp\.down_proj\.weight$"), "ffn_down"),
    (re.compile(r"blocks\.\d+\.mlp\.up_proj\.weight$"), "ffn_up"),
    (re.compile(r"blocks\.\d+\.mlp\.gate_proj\.weight$"), "ffn_gate"),
    (re.compile(r"tok_emb\.weight$"), "embeddings"),
    (re.compile(r"lm_head\.weight$"), "head"),
)


def role(name: str) -> str | None:
    for pattern, r in ROLE_PATTERNS:
        if pattern.match(name):
            return r
    return None


def check_recipe(recipe: str) -> str:
    r = str(recipe).lower()
    if r not in RECIPES:
        raise QuantError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    return r


def check_embeddings(embeddings: str) -> str:
    e = str(embeddings).lower()
    if e not in EMBEDDING_CHOICES and e not in FORMATS:
        raise QuantError(f"unknown embeddings type {embeddings!r}; valid: {', '.join(EMBEDDING_CHOICES + tuple(FORMATS))}")
    return e


def display_name(qtype: str, recipe: str) -> str:
    return qtype.upper() if recipe == "pure" else f"{qtype}_{recipe}".upper()


@dataclass
class Plan:
    """Which weight gets which type."""

    qtype: str
    recipe: str
    embeddings: str
    types: dict[str, str] = field(default_factory=dict)  # tensor name -> format name
    kept: dict[str, str] = field(default_factory=dict)  # tensor name -> why it stays in full precision

    @property
    def name(self) -> str:
        return display_name(self.qtype, self.recipe)


def plan(shapes: dict[str, tuple[int, ...]], qtype: str, recipe: str = "pure",
         embeddings: str = DEFAULT_EMBEDDINGS) -> Plan:
    """Assign a type to every quantizable weight of a model, given its tensor shapes."""
    qtype = get_format(qtype).name
    recipe = check_recipe(recipe)
    embeddings = check_embeddings(embeddings)
    p = Plan(qtype, recipe, embeddings)
    for name, shape in shapes.items():
        r = role(name)
        if r is None or len(shape) != 2:
            continue
        if r in ("embeddings", "head"):
            if embeddings == "keep":
                continue
            t = qtype if embeddings == "same" else embeddings
        else:
            t = STEP_UP[qtype] if r in MORE_BITS[recipe] else qtype
        fmt = FORMATS[t]
        if not fmt.fits(shape[1]):
            p.kept[name] = f"inner size {shape[1]} is not a multiple of {t}'s block size {fmt.block_size}"
            continue
        p.types[name] = t
    return p


def tensor_bytes(name: str, shape, dtype_size: int, types: dict[str, str]) -> int:
    n = 1
    for s in shape:
        n *= s
    if name in types:
        fmt = FORMATS[types[name]]
        return n // shape[-1] * fmt.row_bytes(shape[-1])
    return n * dtype_size


def summarize(shapes: dict[str, tuple], dtype_sizes: dict[str, int], types: dict[str, str]) -> dict:
    """Parameters, bytes and bits per weight of the whole model under `types`."""
    params = total = qparams = qbytes = 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        b = tensor_bytes(name, shape, dtype_sizes[name], types)
        params += n
        total += b
        if name in types:
            qparams += n
            qbytes += b
    return {"params": params, "weights_bytes": total, "bits_per_weight": 8 * total / params if params else 0.0,
            "quantized_params": qparams,
            "quantized_bits_per_weight": 8 * qbytes / qparams if qparams else 0.0}


# --- a model directory ----------------------------------------------------------------------------


def quantize_dir(model: str | os.PathLike, out: str | os.PathLike, qtype: str, recipe: str = "pure",
                 embeddings: str = DEFAULT_EMBEDDINGS, calibrate: str | os.PathLike | None = None,
                 ctx: int | None = None, force: bool = False, progress=None) -> dict:
    """Quantize a model directory into `out` (atomically). Returns what was done, for the CLI."""
    import torch

    from lbdl_cli.atomic import check_out
    from lbdl_cli.checkpoint import TOKENIZER_FILE, atomic_dir, load_model, read_config, write_model

    qtype, recipe, embeddings = get_format(qtype).name, check_recipe(recipe), check_embeddings(embeddings)
    config = read_config(model)
    refuse_quantized(config, model)
    check_out(out, force)
    start = time.perf_counter()
    fp_model, config = load_model(model)
    state = fp_model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    p = plan(shapes, qtype, recipe, embeddings)
    calibration = importance = None
    if calibrate is not None:
        from .calibrate import collect_importance

        importance, calibration = collect_importance(fp_model, Path(model), calibrate, ctx=ctx)
    dtype_sizes = {k: v.element_size() for k, v in state.items()}
    out_state = {}
    with torch.no_grad():
        for name, t in state.items():
            if name in p.types:
                out_state[name] = _quantize_tensor(t, p.types[name], name, importance)
                if progress is not None:
                    progress(1)
            else:
                out_state[name] = t
    del fp_model
    stats = summarize(shapes, dtype_sizes, p.types)
    section = quantization_section(p, stats, source=str(model), calibration=calibration)
    sections = {k: v for k, v in config.items() if k not in ("format_version", "model", "quantization")}
    sections["quantization"] = section
    tok = Path(model) / TOKENIZER_FILE
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, fp_model_config(config), out_state, tokenizer=tok if tok.is_file() else None,
                    sections=sections)
    original = sum(tensor_bytes(k, s, dtype_sizes[k], {}) for k, s in shapes.items())
    return {"out": str(out), "name": p.name, "type": qtype, "recipe": recipe, "embeddings": embeddings,
            **stats, "original_bytes": original, "size_bytes": _dir_size(Path(out)),
            "tensors": [{"name": k, "type": p.types.get(k, _dtype_name(state[k])), "shape": list(shapes[k]),
                         "bytes": tensor_bytes(k, shapes[k], dtype_sizes[k], p.types)} for k in shapes],
            "kept": p.kept, "calibration": calibration, "seconds": time.perf_counter() - start}


def _quantize_tensor(t, qtype: str, name: str, importance):
    from .formats import quantize

    imp = importance.get(name) if importance else None
    return quantize(t, qtype, name=name, importance=imp)


def fp_model_config(config: dict):
    from lbdl_cli.model import ModelConfig

    return ModelConfig.from_dict(config["model"])


def quantization_section(p: Plan, stats: dict, source: str | None = None, calibration: dict | None = None) -> dict:
    section = {
        "name": p.name, "type": p.qtype, "recipe": p.recipe, "embeddings": p.embeddings,
        "bits_per_weight": round(stats["bits_per_weight"], 4),
        "quantized_bits_per_weight": round(stats["quantized_bits_per_weight"], 4),
        "layout": "packed rows of ggml blocks as uint8 (lbdl quant/formats.py)",
        "tensors": dict(p.types),
    }
    if p.kept:
        section["kept"] = dict(p.kept)
    if source is not None:
        section["source"] = source
    if calibration:
        section["calibration"] = calibration
    return section


def refuse_quantized(config: dict, where) -> None:
    q = config.get("quantization")
    if q:
        raise QuantError(f"{where} is already quantized ({q.get('name', q.get('type', '?'))}); "
                         f"quantize the full-precision model it came from instead")


def _dtype_name(t) -> str:
    """safetensors' name of a dtype (F32, BF16, ...), as `lbdl info` shows it."""
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(str(t.dtype).replace("torch.", ""),
                                                                         str(t.dtype).replace("torch.", ""))


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
