"""Calibration: an importance vector per weight from squared input activations (llama.cpp's imatrix).

Run the full-precision model over some text and, for every linear layer
(and the head, whose input is the final norm's output), average x^2 over all
positions for each input column. Columns that carry large activations matter
more: the scale search of every affine format (quant/formats.py) weights each
weight's error by its column's importance.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from lbdl_cli.errors import DataError

MAX_TOKENS = 32768  # calibration tokens used at most (llama.cpp's imatrix default is a few hundred chunks)


def read_calibration_ids(model_dir: Path, path: str | os.PathLike, ctx: int) -> list[int]:
    from lbdl_cli.checkpoint import TOKENIZER_FILE
    from tokenizer import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"calibration file {path} is not UTF-8 text (byte {e.start})") from None
    if not (Path(model_dir) / TOKENIZER_FILE).is_file():
        raise DataError(f"{model_dir} has no {TOKENIZER_FILE}, so calibration text cannot be encoded")
    ids = Tokenizer.load(model_dir).encode(text)
    if len(ids) < ctx:
        raise DataError(f"calibration text {path} has {len(ids)} tokens, fewer than one window of {ctx}; "
                        f"use a longer text or a smaller --ctx")
    return ids


@torch.no_grad()
def importance_from_ids(model: nn.Module, ids, ctx: int, batch_size: int = 4,
                        max_tokens: int = MAX_TOKENS) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean squared input activation per column, for every nn.Linear weight and the (tied) head."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n_windows = max(1, min(len(ids) // ctx, max_tokens // ctx))
    windows = ids[: n_windows * ctx].view(n_windows, ctx)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name):
        def hook(module, args, output=None):
            x = (args[0] if output is None else output).detach().float()
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(record(f"{name}.weight")))
    if getattr(model, "lm_head", None) is None and hasattr(model, "norm_f"):
        handles.append(model.norm_f.register_forward_hook(record("tok_emb.weight")))  # the tied head's input
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, n_windows, batch_size):
            model(windows[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    importance = {k: sums[k] / counts[k] for k in sums}
    return importance, {"tokens": int(n_windows * ctx), "windows": int(n_windows), "ctx": int(ctx)}


def collect_importance(model: nn.Module, model_dir: Path, path: str | os.PathLike,
                       ctx: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Importance vectors of a loaded full-precision model from a calibration text file."""
    ctx = ctx or model.config.block_size
    ids = read_calibration_ids(model_dir, path, ctx)
    importance, info = importance_from_ids(model, ids, ctx)
    return importance, {"file": str(path), **info}
