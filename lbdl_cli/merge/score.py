"""Scoring a model on task files, as `lbdl merge search` scores its candidates: the mean NLL of the completions
(loss, lower is better) or the exact match of greedy completions (accuracy), averaged over the files."""

from __future__ import annotations

import math

from ..errors import DataError
from ..files import read_jsonl

ROWS = 16  # records per forward pass


# --- scoring ------------------------------------------------------------------------------------------------------


def read_eval(path: str, metric: str, limit: int | None = None) -> list[dict]:
    """The first `limit` records of an --eval file: {prompt, completion} for the loss (a record's "answer" as
    the completion when it has no "completion"), evaluate.load_tasks's records for accuracy."""
    if metric == "accuracy":
        from ..evaluate import load_tasks

        return load_tasks(path)[:limit]
    records = []
    for n, rec in read_jsonl(path, "eval file"):
        prompt, completion = rec.get("prompt"), rec.get("completion", rec.get("answer"))
        if isinstance(completion, (int, float)) and not isinstance(completion, bool) and "completion" not in rec:
            completion = str(completion)
        if not isinstance(prompt, str) or not prompt or not isinstance(completion, str):
            raise DataError(f'eval file {path}:{n}: the loss needs a "prompt" text and a "completion" (or '
                            f'"answer") text; write {{"prompt": ..., "completion": ...}} records')
        records.append({"prompt": prompt, "completion": completion})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f'eval file {path} holds no records; write one {{"prompt": ..., "completion": ...}} '
                        f"object per line")
    return records


def loss_batches(records: list[dict], tok, block_size: int) -> list:
    """[(x, y)]: each record a row (records.pack_examples without packing), y -100 outside the completion and
    its <eos>; rows as long as the longest record (at most the model's context)."""
    from ..records import encode_records, pack_examples

    examples = encode_records(records, tok, fmt="completion")
    context = max(1, min(block_size, max(len(ids) for ids, _ in examples) - 1))
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    ids, labels = pack_examples(examples, context, pad, pack=False)  # (rows, context + 1) each
    return [(ids[i:i + ROWS, :-1], labels[i:i + ROWS, 1:]) for i in range(0, len(ids), ROWS)]


def mean_loss(model, batches: list) -> float:
    """Mean NLL (nats) of the scored tokens of `batches`."""
    import torch
    import torch.nn.functional as F

    from ..records import IGNORE

    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in batches:
            logits = model(x.to(device))  # (B, T, V)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                  reduction="sum")
            total += float(nll)
            count += int((y != IGNORE).sum())
    return total / count


class Scorer:
    """Scores a model on every --eval file; the objective is their mean."""

    def __init__(self, evals: dict[str, list[dict]], tok, block_size: int, metric: str):
        self.tok, self.metric = tok, metric
        self.evals = evals
        self.batches = {p: loss_batches(r, tok, block_size) for p, r in evals.items()} if metric == "loss" else {}

    def __call__(self, model) -> dict:
        scores = {p: self.score(model, p) for p in self.evals}
        objective = sum(scores.values()) / len(scores)
        return {"scores": scores, "objective": objective if math.isfinite(objective) else math.inf}

    def score(self, model, path: str) -> float:
        if self.metric == "loss":
            return mean_loss(model, self.batches[path])
        from ..evaluate import task_accuracy

        return float(task_accuracy(model, self.tok, self.evals[path], batch_size=ROWS)["accuracy"])


def score_dir(model_dir: str, evals: list[str], cfg=None) -> dict:
    """{"scores", "objective"} of a model directory, scored as the search scores a candidate (float32, the same
    records; `cfg` a SearchConfig, for its metric, limit and device): a search's output reproduces its best
    trial."""
    import torch

    from .. import kernels
    from ..checkpoint import load_model, model_tokenizer

    if cfg is None:
        from .search import SearchConfig

        cfg = SearchConfig()
    device = kernels.resolve_device(cfg.device)
    model, config = load_model(model_dir, dtype=torch.float32, device=device)
    kernels.inference_layout(model.matrices())
    scorer = Scorer({p: read_eval(p, cfg.metric, cfg.limit) for p in evals}, model_tokenizer(model_dir, config),
                    model.config.block_size, cfg.metric)
    return scorer(model.eval())
