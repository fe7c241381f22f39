"""Contrastive fine-tuning (`lbdl finetune MODEL PAIRS.jsonl --objective contrastive`): a model made into a
retriever for `lbdl rag` (LBDL 8.1), on the loop of `lbdl train`, with LoRA, QLoRA or every weight.

Each record is a pair {"query": ..., "passage": ...}. A text is embedded exactly as rag/embed.py embeds it
(`encode_for_embedding`, `pad_batch`, `pool`: the same code): its tokens cut to context - 1, <eos> appended,
the final-norm hidden state at the <eos> (or the mean, --pooling), L2-normalised. The loss is InfoNCE with
in-batch negatives (Oord et al. 2018; as DPR, Karpukhin et al. 2020): the (N, N) cosine similarities of the
N queries and N passages of the global batch, divided by the temperature, scored by cross-entropy against
the diagonal, symmetric: the mean of query -> passage (rows) and passage -> query (columns).

The negatives are the whole global batch, every micro-batch of every rank: a step embeds its micro-batches
without the graph, gathers the embeddings across ranks, takes the loss and its gradient with respect to the
embeddings, then runs each micro-batch again with the graph and backpropagates its rows' gradient (gradient
caching, Gao et al. 2021). The loss and the gradients are those of one batch of batch x accum x ranks pairs,
however it is split, with the activations of one micro-batch in memory, for one extra forward per step. The
second pass replays each micro-batch's random state, so dropout draws the same masks.

Validation: the same loss on fixed batches of --batch-size held-out pairs (val_fraction of the records), and
in-batch recall@1 (the share of queries whose most similar passage in their batch is their own).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..rag.embed import encode_for_embedding, pad_batch, pool
from ..records import read_pairs, split_records
from .config import FinetuneConfig
from .distributed import Dist
from .parts import Checkpoints, Parts


def info_nce(sim: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """sim (N, N): similarity of query i and passage j, the true pairs on the diagonal -> the symmetric InfoNCE
    loss: (CE(sim / t, diag) over rows + the same over columns) / 2; "sum": summed over the N pairs."""
    logits = sim.float() / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(logits, labels, reduction=reduction)
            + F.cross_entropy(logits.t(), labels, reduction=reduction)) / 2


def recall_at_1(sim: torch.Tensor) -> float:
    """Queries (rows) whose most similar passage is their own (the diagonal)."""
    return float((sim.argmax(dim=1) == torch.arange(sim.shape[0], device=sim.device)).sum())


def encode_pairs(pairs: list[tuple[str, str]], tok, context: int) -> list[tuple[list[int], list[int]]]:
    """(query ids, passage ids) of each pair, each cut to context - 1 tokens and ended by <eos> (as embed.py)."""
    queries = encode_for_embedding(tok, [q for q, _ in pairs], context - 1)
    passages = encode_for_embedding(tok, [p for _, p in pairs], context - 1)
    return list(zip(queries, passages))


class PairSampler:
    """The Sampler of contrastive training: pairs in the order of a permutation seeded by (seed, epoch), as
    records.RecordSampler's rows. A batch (x, y) of `count` pairs is x (2 count, T) ids, the queries then the
    passages, right-padded, and y (2 count,) their lengths (the <eos> included)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], seed: int, pad_id: int):
        self.pairs, self.seed, self.pad_id = pairs, seed, pad_id
        self.n_samples = len(pairs)
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_samples, generator=g), epoch
        return self._perm

    def batch(self, start: int, count: int, device="cpu"):
        chosen = [self.pairs[int(self._permutation(i // self.n_samples)[i % self.n_samples])]
                  for i in range(start, start + count)]
        return pair_batch(chosen, self.pad_id, device)


def pair_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, device="cpu"):
    return pad_batch([q for q, _ in pairs] + [p for _, p in pairs], pad_id, device)


def _rng_state(device: str) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rows(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """(n, C) on each rank -> (world n, C), rank 0's rows first (no gradient)."""
    if not dist.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class ContrastiveObjective:
    """The loop's Objective (parts.py) for pairs: InfoNCE over the global batch, gradient-cached."""

    metrics = ("val_recall_at_1",)

    def __init__(self, pooling: str, temperature: float):
        self.pooling, self.temperature = pooling, temperature

    def embed(self, net, x, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (n, C), passages (n, C)): unit-norm float32 embeddings of a batch of the PairSampler."""
        e = pool(net(x, hidden=True), lengths, self.pooling)  # through forward: DDP and FSDP see the call
        n = e.shape[0] // 2
        return e[:n], e[n:]

    def loss(self, net, x, y):
        q, p = self.embed(net, x, y)
        return info_nce(q @ p.t(), self.temperature)

    def score(self, net, x, y) -> tuple[float, float, dict]:
        q, p = self.embed(net, x, y)
        sim = q @ p.t()
        n = sim.shape[0]
        return info_nce(sim, self.temperature).item() * n, float(n), {"val_recall_at_1": recall_at_1(sim)}

    def backward(self, net, batches: list, dist: Dist, autocast) -> float:
        device = dist.device
        # 1. every micro-batch's embeddings without the graph, keeping each one's random state
        states, qs, ps = [], [], []
        with torch.no_grad():
            for x, y in batches:
                states.append(_rng_state(device))
                with autocast():
                    q, p = self.embed(net, x, y)
                qs.append(q)
                ps.append(p)
        mine_q, mine_p = torch.cat(qs), torch.cat(ps)
        # 2. the loss of the global batch (every rank's embeddings) and its gradient on this rank's rows
        all_q = gather_rows(mine_q, dist).requires_grad_()
        all_p = gather_rows(mine_p, dist).requires_grad_()
        loss = info_nce(all_q @ all_p.t(), self.temperature)
        grad_q, grad_p = torch.autograd.grad(loss, (all_q, all_p))
        n = mine_q.shape[0]
        grad_q, grad_p = grad_q[dist.rank * n:(dist.rank + 1) * n], grad_p[dist.rank * n:(dist.rank + 1) * n]
        # 3. each micro-batch again, with the graph: its rows' gradient, times world (DDP averages over ranks;
        # the global gradient is the sum of every rank's share)
        offset = 0
        for micro, ((x, y), state) in enumerate(zip(batches, states)):
            _set_rng_state(state, device)
            sync = micro == len(batches) - 1 or not hasattr(net, "no_sync")
            with contextlib.nullcontext() if sync else net.no_sync():
                with autocast():
                    q, p = self.embed(net, x, y)
                m = q.shape[0]
                surrogate = (q * grad_q[offset:offset + m]).sum() + (p * grad_p[offset:offset + m]).sum()
                (surrogate * dist.world).backward()
            offset += m
        return loss.item()


def embedding_record(cfg: FinetuneConfig) -> dict:
    """What a contrastive run's checkpoints record of how to embed with them (rag/embed.recorded_pooling)."""
    return {"objective": "contrastive", "pooling": cfg.pooling, "temperature": cfg.contrastive_temperature}


def pair_parts(cfg: FinetuneConfig, dist: Dist, model, tok, context: int, checkpoints: Checkpoints) -> Parts:
    """The Parts of a contrastive run: the pairs of --data, split, encoded and sampled; the model prepared by
    finetune_parts (loaded, adapted)."""
    pairs = read_pairs(Path(cfg.data), cfg.records.max_records)
    train, val = split_records(pairs, cfg.records.val_fraction, cfg.records.seed)
    pad_id = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    sampler = PairSampler(encode_pairs(train, tok, context), cfg.seed, pad_id)
    held_out = PairSampler(encode_pairs(val, tok, context), cfg.seed + 1, pad_id)
    B = cfg.batch_size
    count = min(cfg.eval_batches * B, held_out.n_samples)
    batches = [held_out.batch(i, min(B, count - i)) for i in range(0, count, B)]
    if model.lm_head is not None:  # an untied head reads no embedding: frozen (DDP refuses unused parameters)
        model.lm_head.requires_grad_(False)
    return Parts(model=model, sampler=sampler, n_samples=sampler.n_samples,
                 samples=f"query/passage pairs (texts cut to {context - 1} tokens)",
                 val=batches[dist.rank::dist.world], context=context, checkpoints=checkpoints,
                 objective=ContrastiveObjective(cfg.pooling, cfg.contrastive_temperature))
