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
    """Lay out a CPU float32 model's matrices for the kernel that multiplies them fastest by one
    vector (decoding reads every weight once per token), in place: same values, same shapes.
    `model.linear` sends a row-major float32 weight to oneDNN and any other to F.linear's MKL
    product. Measured on whole decodes (2-core AVX-512 EPYC): MKL with a column-major matrix (a
    transposed view of an (in, out) tensor, as Hugging Face's GPT-2 keeps its Conv1D weights)
    is fastest for small matrices, oneDNN with the row-major one for matrices of 1 MiB and more
    (1.3x on a 27.6M model, 1.1x on GPT-2 124M, whose prompts also run 1.2x faster). The rule
    depends on shapes only, so a model computes the same numbers on every run. Without oneDNN
    every matrix goes column-major; bfloat16 and GPU weights are left as they are. Returns the
    model."""
    import torch
    import torch.nn as nn

    from ..model import _onednn_fp32

    w = model.tok_emb.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    params = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if model.config.tie_embeddings:
        params.append(w)  # the head is the embedding matrix
    small = 1 << 18  # entries: 1 MiB of float32
    onednn = _onednn_fp32()
    with torch.no_grad():
        for p in params:
            if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.stride(0) == 1:  # packed, or done
                continue
            if not onednn or p.numel() < small:
                p.data = p.data.t().contiguous().t()
    return model
