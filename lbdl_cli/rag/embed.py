"""Dense text embeddings from any lbdl model directory (LBDL 6.6).

    from lbdl_cli.rag.embed import load_embedder
    emb = load_embedder("run/best", pooling="eos")
    vectors = emb.embed(["a question", "a passage"])  # (2, C) float32, unit rows: cosine = dot product

A text is encoded, `<eos>` appended, and the model run to its final norm
(`GPT.hidden_states`); "eos" pooling takes the hidden state at that `<eos>`
(the one position that has read the whole text), "mean" the mean over the
text's tokens and the `<eos>`. Texts are batched by length and right-padded:
attention is causal, so padding after a row's last real token changes none of
its positions, and each row is pooled at its own length. `pool` and
`pad_batch` are the one implementation, shared with the contrastive
fine-tuning objective (train/), so that a trained embedder is read the way
it was trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..progress import Progress, report

if TYPE_CHECKING:
    import torch

POOLINGS = ("eos", "mean")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose {' or '.join(POOLINGS)}")
    return pooling


def pad_batch(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (each already ending in <eos>) -> idx (B, T) right-padded with `pad_id`, lengths (B,)."""
    import torch

    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return idx.to(device), torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, T, C) final-norm states of right-padded rows, lengths (B,) real positions per row (the <eos>
    last) -> (B, C) float32, each row L2-normalised. "eos": the state at position length-1; "mean": the mean over
    positions [0, length). Differentiable (training uses it)."""
    import torch
    import torch.nn.functional as F

    check_pooling(pooling)
    hidden = hidden.float()
    B, T, _ = hidden.shape
    if pooling == "eos":
        pooled = hidden[torch.arange(B, device=hidden.device), lengths - 1]  # (B, C)
    else:
        mask = (torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]).float()  # (B, T)
        pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].float()  # (B, C)
    return F.normalize(pooled, dim=-1)


def encode_for_embedding(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text's ids cut to its first `max_tokens`, then <eos>."""
    return [ids[:max_tokens] + [tokenizer.eos_id] for ids in tokenizer.encode_batch(list(texts))]


def embed_rows(model, rows: list[list[int]], pooling: str, pad_id: int) -> torch.Tensor:
    """Rows of ids (each ending in <eos>) -> (B, C) float32 unit-norm embeddings, one batch, with grad if enabled."""
    device = next(model.parameters()).device
    idx, lengths = pad_batch(rows, pad_id, device)
    return pool(model.hidden_states(idx), lengths, pooling)


class Embedder:
    """A model read as a text embedder: `embed(texts)` -> (N, C) unit-norm float32 rows."""

    def __init__(self, model, tokenizer, identity: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.pooling = identity["pooling"]
        self.max_tokens = model.config.block_size - 1  # room for the appended <eos>

    def embed(self, texts: list[str], batch_size: int = 16, progress: Progress | None = None) -> torch.Tensor:
        """(N, C) float32, each row unit-norm. A text longer than max_tokens is cut to its first max_tokens
        tokens. Texts run in batches of similar length (little padding); rows come back in the input's order.
        Progress: report(progress, "embed", done, total, unit="texts")."""
        import torch

        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        rows = encode_for_embedding(self.tokenizer, texts, self.max_tokens)
        out = torch.empty(len(rows), self.identity["dim"], dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        report(progress, "embed", 0, len(rows), unit="texts")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                vectors = embed_rows(self.model, [rows[i] for i in chosen], self.pooling, self.tokenizer.eos_id)
                out[torch.tensor(chosen)] = vectors.cpu()
                report(progress, "embed", start + len(chosen), len(rows), unit="texts")
        return out


def same_model(a: dict, b: dict) -> bool:
    """Whether two embedders' identities are the same model: equal weights (sha256), adapter and pooling."""
    return all(a.get(k) == b.get(k) for k in ("sha256", "adapter_sha256", "pooling"))


def recorded_pooling(model_dir: str | os.PathLike | None, adapter: str | os.PathLike | None = None) -> str | None:
    """The pooling a contrastive fine-tune (`lbdl finetune --objective contrastive`) trained with: the "embedding"
    section of the adapter's training.json (a LoRA run's checkpoint), else of the model's config.json (a full
    run's); None when neither records one (then "eos" is the default)."""
    import json

    places = [Path(adapter) / "training.json"] if adapter is not None else []
    if model_dir is not None:
        places.append(Path(model_dir) / "config.json")
    for path in places:
        try:
            section = json.loads(path.read_text(encoding="utf-8")).get("embedding")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(section, dict) and section.get("pooling") in POOLINGS:
            return section["pooling"]
    return None


def load_embedder(model_dir: str | os.PathLike | None, adapter: str | os.PathLike | None = None,
                  pooling: str = "eos", compute_dtype: str = "auto", device: str = "auto",
                  progress: Progress | None = None) -> Embedder:
    """The embedder of a model directory (None: the bundled default model) with an optional LoRA adapter,
    loaded as `generate` loads it (sample.load_for_inference)."""
    from ..checkpoint import default_model_dir
    from ..lora import ADAPTER_WEIGHTS, base_sha256, file_sha256
    from ..sample import load_for_inference

    check_pooling(pooling)
    dir = Path(model_dir) if model_dir is not None else default_model_dir()
    model, tok, _ = load_for_inference(dir, dtype=compute_dtype, device=device, progress=progress, adapter=adapter)
    model.eval()
    identity = {
        "model": str(dir), "sha256": base_sha256(dir),
        "adapter": str(adapter) if adapter is not None else None,
        "adapter_sha256": file_sha256(Path(adapter) / ADAPTER_WEIGHTS) if adapter is not None else None,
        "pooling": pooling, "dim": model.config.n_embd,
    }
    return Embedder(model, tok, identity)
