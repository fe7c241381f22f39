"""Calibration: an importance vector per weight from squared input activations (llama.cpp's imatrix).

Run the full-precision model over some text and, for every linear layer
(and the head, whose input is the final norm's output), average x^2 over all
positions for each input column. Columns that carry large activations matter
more: the scale search of every affine format (quant/formats.py) weights each
weight's error by its column's importance. Reading a calibration text file
and encoding it is lbdl_cli/quantize.py's work (`collect_importance`); this
module takes a model and token ids.
"""

from __future__ import annotations

import torch
import torch.nn as nn

MAX_TOKENS = 32768  # calibration tokens used at most (llama.cpp's imatrix default is a few hundred chunks)


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
