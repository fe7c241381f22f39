"""Post-training quantization: block formats, the runtime module, recipes.

    from quant import quantize, dequantize, QuantLinear, plan, quantize_model
    packed = quantize(linear.weight, "q4_k")               # uint8 (out, row_bytes): ggml Q4_K blocks
    w = dequantize(packed, "q4_k")                          # float32 (out, in)
    qlin = QuantLinear.from_linear(linear, "q4_0")          # packed kernels on CPU, dequantize elsewhere
    p = plan(shapes, "q4_1", recipe="m")                    # which tensor gets which type
    quantize_model(model, p.types)                          # swap the model's modules in place

Three separate things, as in gpt-fast: pure functions tensor <-> packed bytes
(`quant.formats`), a runtime module that keeps only packed weights
(`quant.linear`), and recipes that decide which tensor gets which format
(`quant.recipe`); `quant.calibrate` collects importance vectors from a model
and token ids. Work on model directories (quantizing one, the sweep) is in
`lbdl_cli.quantize`. Names are loaded on first use, so importing `quant`
costs nothing until they are.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMATS": "formats", "Format": "formats", "QuantError": "catalog", "TYPES": "catalog", "get_format": "formats",
    "quantize": "formats", "dequantize": "formats", "codes": "formats", "pack_codes": "formats",
    "group_affine": "formats", "NF4_LEVELS": "formats",
    "QuantLinear": "linear", "QuantEmbedding": "linear", "QuantModule": "linear", "QuantWeight": "linear",
    "quantize_model": "linear", "prepare_quantized": "linear", "quant_modules": "linear",
    "set_backend": "linear", "BACKENDS": "linear", "int4_layout": "int4pack",
    "RECIPES": "recipe", "Plan": "recipe", "plan": "recipe", "summarize": "recipe",
    "importance_from_ids": "calibrate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
