"""Loading a model directory for inference: the compute dtype, the kernels' layout, the tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import Progress, report

if TYPE_CHECKING:
    import torch


def load_for_inference(model_arg: str | os.PathLike | None, dtype: str | torch.dtype | None = None,
                       device: str | torch.device | None = "cpu", progress: Progress | None = None,
                       adapter: str | os.PathLike | None = None, force_base: bool = False, engine: str = "torch"):
    """(model, tokenizer, config.json) of a model directory; None = the bundled default model. `adapter`, a LoRA
    adapter directory, is applied (its recorded base hash checked unless `force_base`) and, on a float base,
    merged in memory; nothing is written. engine="llama.cpp": the model is engine.LlamaCppModel, the directory
    exported to GGUF (its float matrices in `dtype`; auto: as stored) and run by llama.cpp on the CPU.

    The compute dtype is kernels.compute_dtype's: dtype None or "auto" keeps float32, turns float16 into
    float32 on a CPU, and keeps bfloat16 on a CPU only where this machine computes it faster than float32;
    an explicit dtype is honoured, and when it is the slow choice here a one-line warning goes to
    `progress`. Quantized weights get the backend the machine's probe chose (checkpoint.load_model), and
    float matrices the layout of their fastest kernels (kernels.inference_layout).
    """
    from .. import kernels
    from ..checkpoint import default_model_dir, load_model, model_tokenizer, parse_dtype, read_config

    dir = Path(model_arg) if model_arg is not None else default_model_dir()
    config = read_config(dir)
    tok = model_tokenizer(dir, config)  # a missing or foreign directory or tokenizer fails here
    if engine != "torch":
        from .engine import check_engine_options, load_llama_cpp

        check_engine_options(engine, device, adapter)
        return load_llama_cpp(dir, dtype, progress, config=config), tok, config
    device = kernels.resolve_device(device)
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype)
    dtype, note = kernels.compute_dtype(_stored_dtype(dir), dtype, device)
    if note:
        report(progress, "load", message=note, level="warning")
    model, config = load_model(dir, dtype=dtype, device=device)
    if adapter is not None:
        from ..lora import load_adapter, merge_lora

        load_adapter(model, adapter, base_dir=dir, force_base=force_base)
        if "quantization" not in config:  # folded in memory (W + s B A): inference at the base's speed
            merge_lora(model)  # (a quantized base keeps its kernels and runs the adapter beside them)
        model.to(device)
    kernels.inference_layout(model.matrices())
    return model, tok, config


def describe(model) -> dict:
    """The engine, device and dtype a result reports of a loaded model (llama.cpp: the GGUF file's type)."""
    from .engine import LlamaCppModel

    if isinstance(model, LlamaCppModel):
        return {"engine": "llama.cpp", "device": str(model.device), "dtype": model.file_type.lower()}
    weight = model.tok_emb.weight
    return {"engine": "torch", "device": str(weight.device), "dtype": str(weight.dtype).replace("torch.", "")}


def _stored_dtype(dir: Path) -> torch.dtype:
    """The dtype of a model directory's float tensors, read from the safetensors header (float32 when they
    differ or there are none)."""
    import torch

    from ..checkpoint import SAFETENSORS_DTYPES, weights_path
    from ..files import tensor_entries

    found = {SAFETENSORS_DTYPES.get(entry.get("dtype")) for entry in tensor_entries(weights_path(dir)).values()}
    floats = {d for d in found if d is not None and d.is_floating_point}
    return floats.pop() if len(floats) == 1 else torch.float32
