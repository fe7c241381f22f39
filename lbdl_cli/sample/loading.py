"""Loading a model directory for inference, and the device it runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch


# --- loading --------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (None) = cuda when torch sees one, else cpu; cuda asked for without one is refused."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = device or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu "
                          "or install a CUDA build of torch")
    return torch.device(name)


def load_for_inference(model_arg: str | os.PathLike | None, dtype: str | torch.dtype | None = None,
                       device: str | torch.device | None = "cpu"):
    """(model, tokenizer, config.json) of a model directory; None = the bundled default model.

    dtype None or "auto" keeps the stored precision, except float16 on a CPU,
    which becomes float32 (float16 is hundreds of times slower there).
    """
    import torch

    from tokenizer import Tokenizer

    from ..checkpoint import TOKENIZER_FILE, default_model_dir, load_model, parse_dtype, read_config

    dir = Path(model_arg) if model_arg is not None else default_model_dir()
    read_config(dir)  # a missing or foreign directory fails here, before the tokenizer check
    if not (dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{dir} has no {TOKENIZER_FILE}, so its text cannot be encoded; copy in the "
                              f"tokenizer the model was trained with (cp TOKENIZER_DIR/{TOKENIZER_FILE} {dir}/)")
    device = resolve_device(device)
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 is hundreds of times slower on a CPU; use --dtype float32 or bfloat16")
    model, config = load_model(dir, dtype=dtype, device=device)
    if dtype is None and device.type == "cpu" and model.tok_emb.weight.dtype == torch.float16:
        model = model.float()
    inference_layout(model)
    tok = Tokenizer.load(dir)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; the tokenizer.model does not belong to this model")
    return model, tok, config


def inference_layout(model):
    """Lay out a CPU float32 model's matrices for the kernels that multiply them fastest by one
    vector (decoding reads every weight once per token), in place: same values, same shapes.
    Column-major (a transposed view of an (in, out) tensor, as Hugging Face's GPT-2 keeps its
    Conv1D weights) for matrices under 1 MiB (MKL's product, F.linear) and for larger ones with
    at least as many outputs as inputs (`model.split_gemv`, a slice per thread); row-major for
    larger ones with fewer outputs than inputs (an MLP's down projection: oneDNN's linear). See
    `model.linear`. Measured on whole decodes (2-core AVX-512 EPYC): the first rule made micro
    40% faster than oneDNN everywhere; the second made a 27.6M model's steps 1.01-1.15x faster
    than oneDNN for every large matrix (four runs, the two alternating in one process). The rule depends on shapes only, so a model computes the
    same numbers on every run. Without oneDNN every matrix goes column-major; bfloat16 and GPU
    weights are left as they are. Returns the model."""
    import torch
    import torch.nn as nn

    from ..model import LARGE_MATRIX, _onednn_fp32

    w = model.tok_emb.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    params = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if model.config.tie_embeddings:
        params.append(w)  # the head is the embedding matrix
    onednn = _onednn_fp32()
    with torch.no_grad():
        for p in params:
            if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.stride(0) == 1:  # packed, or done
                continue
            if not onednn or p.numel() < LARGE_MATRIX or p.shape[0] >= p.shape[1]:
                p.data = p.data.t().contiguous().t()
    return model
