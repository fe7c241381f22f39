"""Recipes: which tensor gets which format, and what that costs in bytes (pure planning, no files).

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
the bits per weight. Nothing is pickled. Writing such a directory (and the
sweep) is lbdl_cli/quantize.py's work; this module only decides and counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .catalog import DEFAULT_EMBEDDINGS, EMBEDDING_CHOICES, RECIPES, check_embeddings, check_recipe  # noqa: F401
from .formats import FORMATS, get_format

MORE_BITS = {"pure": (), "s": ("attn_v",), "m": ("attn_v", "ffn_down"),
             "l": ("attn_v", "ffn_down", "ffn_up", "ffn_gate")}
STEP_UP = {"q4_0": "q5_0", "q5_0": "q8_0", "q4_1": "q5_1", "q5_1": "q8_0", "q4_k": "q5_k", "q5_k": "q8_0",
           "nf4": "q8_0", "nf4_dq": "q8_0", "q8_0": "q8_0"}

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
