"""The GPT: one decoder-only transformer that covers the GPT-2 family (LBDL 5.3:
LayerNorm, learned positions, GELU MLP, biases) and the Llama family (RMSNorm,
rotary positions, SwiGLU MLP, no biases, grouped-query attention) as configs.

Reads top-down in architecture order: config, norms, positions, attention
(with its KV cache), MLP, block, GPT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .errors import ConfigError

MLP_KINDS = ("gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")
POSITION_KINDS = ("learned", "rope")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    block_size: int = 256  # the longest context the model accepts
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (plain multi-head attention)
    n_embd: int = 128
    intermediate_size: int | None = None  # None: 4 * n_embd (gelu) or the Llama rule (swiglu)
    mlp: str = "gelu"  # gelu (GPT-2's tanh approximation) | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    positions: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    bias: bool = True  # biases in every linear layer and LayerNorm
    tie_embeddings: bool = True  # the head reuses the token embedding matrix
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive(name)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        positive("n_kv_head")
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", default_intermediate_size(self.n_embd, self.mlp))
        positive("intermediate_size")
        for name, allowed in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("positions", POSITION_KINDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model config: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model config: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"model config: rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ConfigError(f"model config: norm_eps must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model config: rope_theta must be positive, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"model config: unknown field(s) {', '.join(unknown)}; valid fields are {', '.join(sorted(known))}"
            )
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def default_intermediate_size(n_embd: int, mlp: str) -> int:
    if mlp == "swiglu":  # Llama: 2/3 of 4*C, rounded up to a multiple of 64
        return 64 * math.ceil(int(8 * n_embd / 3) / 64)
    return 4 * n_embd


# --- norms -------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (B, T, C)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# --- rotary positions ----------------------------------------------------------


def rope_tables(head_dim: int, length: int, theta: float, device=None):
    """cos and sin tables (length, head_dim), halves layout (as Hugging Face Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x (B, H, T, D); cos, sin (T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --- linear layers -----------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear whose products run through kernels.linear (the fastest CPU kernel for the call)."""

    def forward(self, x):
        return kernels.linear(x, self.weight, self.bias)


# --- attention and its KV cache -------------------------------------------------


class KVCache:
    """Keys and values of the positions seen so far, preallocated per layer.

    `length` is the number of cached positions; the model writes new positions
    at [length, length + T) and advances it after the last layer. `qkv` holds,
    per layer, the stacked q/k/v matrix the cached forward uses (None: the
    separate projections), taken when the cache is made (GPT.new_cache).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        self.max_len = max_len or cfg.block_size
        shape = (batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.qkv = [None] * cfg.n_layer

    def update(self, layer: int, k, v):  # k, v (B, Hkv, T, D) -> all cached (B, Hkv, length+T, D)
        start, new = self.length, k.shape[2]
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, start, new).copy_(k)
        values.narrow(2, start, new).copy_(v)
        return keys.narrow(2, 0, start + new), values.narrow(2, 0, start + new)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.v_proj = Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.o_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qkv_sizes = (cfg.n_embd, kv_dim, kv_dim)
        self._fused = None  # (key, weight, bias): q, k, v stacked for decoding, see fused_qkv

    def fused_qkv(self):
        """(weight, bias) of q, k and v stacked: one matrix multiply per decoded token instead of three.

        Built on first use and rebuilt whenever a projection's tensors change (a new
        tensor or an in-place update); None when a projection is not a plain Linear
        (an adapter or a quantized layer), which then runs as it is.
        """
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if any(type(p) is not Linear for p in projs):
            return None
        try:
            key = tuple((t.data_ptr(), t._version) for p in projs for t in (p.weight, p.bias) if t is not None)
        except RuntimeError:  # inference tensors keep no version counter
            return None
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                ws = [p.weight.detach() for p in projs]
                if all(w.stride(0) == 1 and w.shape[1] > 1 for w in ws):  # column-major: keep the layout
                    weight = torch.cat([w.t() for w in ws], dim=1).t()
                else:
                    weight = torch.cat(ws)
                bias = torch.cat([p.bias.detach() for p in projs]) if self.q_proj.bias is not None else None
            self._fused = (key, weight, bias)
        return self._fused[1:]

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, C = x.shape
        fused = cache.qkv[self.layer] if cache is not None and not self.training else None
        if fused is not None:  # generation: one matrix multiply
            q, k, v = kernels.linear(x, *fused).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            cached_k, cached_v = cache.update(self.layer, k, v)  # (B, Hkv, past+T, D)
            if past:  # a prompt's first pass attends to its own k, v; later ones to the cache
                q, k, v = q.to(cached_k.dtype), cached_k, cached_v  # a CPU cache holds float32 (GPT.new_cache)
        mask, is_causal = None, T > 1
        if past and T > 1:  # new queries attend to every cached key and causally among themselves
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, C).to(x.dtype))
        return self.resid_dropout(y) if self.training else y


# --- feed-forward ---------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C)
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        h = self.down_proj(h)  # (B, T, C)
        return self.dropout(h) if self.training else h


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


# --- the model --------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        # with tied embeddings the head is tok_emb.weight itself: no extra tensor
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.checkpoint_every = 0  # training only: recompute activations in segments of this many blocks
        self.reset_rope()
        if self.tok_emb.weight.device.type != "meta":
            self.apply(self._init_weights)
            scaled_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: residual projections
            for block in self.blocks:
                nn.init.normal_(block.attn.o_proj.weight, std=scaled_std)
                nn.init.normal_(block.mlp.down_proj.weight, std=scaled_std)
            # The head's logits have std = std(W) * sqrt(n_embd) after the final
            # norm, and a random-token loss of about ln(V) + std^2 / 2. GPT-2's
            # plain 0.02 gives +0.17 nats at n_embd 768; capping the head's std
            # at 0.3 / sqrt(n_embd) keeps a fresh model within 0.1 of ln(V).
            head = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
            nn.init.normal_(head, std=min(0.02, 0.3 / math.sqrt(cfg.n_embd)))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_rope(self, device=None):
        """(Re)build the rotary tables; called after loading onto a real device."""
        cfg = self.config
        if cfg.positions != "rope":
            self.rope_cos = self.rope_sin = None
            return
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, targets=None, cache: KVCache | None = None, logits_to_keep: int = 0,
                reduction: str = "mean", hidden: bool = False):
        """idx (B, T) token ids -> logits (B, T, V), or the cross-entropy with targets: the mean over the scored
        targets (those not -100), or their sum with reduction="sum" (0 when none is scored). hidden=True: the
        final-norm hidden states (B, T, C) instead (hidden_states through forward, so that a DDP or FSDP wrapper
        sees the call: embedding training).

        With a cache, idx holds only the new tokens; their positions continue
        from `cache.length`, which advances by T. `logits_to_keep` > 0 applies
        the final norm and the head to the last that many positions only
        (B, logits_to_keep, V): generation needs one, perplexity the scored part.
        """
        x = self.hidden_states(idx, cache, logits_to_keep)  # (B, T, C) after the final norm
        if hidden:
            return x
        head = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
        if self._checkpointing(cache) and targets is not None:
            return _checkpointed_loss(x, head, targets, reduction)
        logits = kernels.linear(x, head)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction=reduction)

    def hidden_states(self, idx, cache: KVCache | None = None, keep: int = 0):
        """idx (B, T) token ids -> the final-norm hidden states (B, T, C): what the head reads, and what an
        embedding pools (LBDL 6.6). Causal: position t depends on idx[:, :t+1] only. `cache` and `keep` (the
        last that many positions only) as in forward."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than block_size {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.pos_emb.weight[start:start + T]  # (T, C): positions start..start+T-1
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        if self.training:
            x = self.drop(x)
        if self._checkpointing(cache):
            x = self._checkpointed_blocks(x, rope)
        else:
            for block in self.blocks:
                x = block(x, rope, cache)
        if cache is not None:
            cache.length += T
        if keep:
            x = x[:, -keep:]  # (B, keep, C)
        return self.norm_f(x)

    def _checkpointing(self, cache) -> bool:
        return bool(self.checkpoint_every and self.training and cache is None and torch.is_grad_enabled())

    def set_checkpointing(self, every: int) -> None:
        """Gradient (activation) checkpointing: keep only the input of each segment of `every` blocks in the
        forward and recompute the segment in the backward (0: off). every=1 keeps the least (one activation per
        block) and recomputes the most; larger segments keep more inside the segment being recomputed, in
        exchange for nothing: the cost is one extra forward of the blocks either way. The head and the loss are
        checkpointed too, in slices of rows (see _checkpointed_loss): the (B, T, V) logits are never whole."""
        self.checkpoint_every = every

    def _checkpointed_blocks(self, x, rope):
        from torch.utils.checkpoint import checkpoint

        def run(first: int, last: int):
            def segment(h):
                for block in self.blocks[first:last]:
                    h = block(h, rope)
                return h
            return segment

        n = len(self.blocks)
        for first in range(0, n, self.checkpoint_every):
            x = checkpoint(run(first, min(n, first + self.checkpoint_every)), x, use_reentrant=False)
        return x

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability of every dropout site (e.g. to fine-tune)."""
        self.config = self.config.replace(dropout=p)
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    @property
    def device(self) -> torch.device:
        """Where the weights are (the token embedding's device)."""
        return self.tok_emb.weight.device

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache in the weights' dtype, but float32 on a CPU: there attention with one
        query (decoding) runs several times faster in float32 than in bfloat16. It also
        holds each layer's stacked q/k/v matrix as the weights are now (see fused_qkv),
        so that a step of decoding does not check them again."""
        w = self.tok_emb.weight
        dtype = torch.float32 if w.device.type == "cpu" and w.is_floating_point() else w.dtype
        cache = KVCache(self.config, batch_size, max_len, device=w.device, dtype=dtype)
        if not self.training:
            cache.qkv = [block.attn.fused_qkv() for block in self.blocks]
        return cache

    def matrices(self) -> list[torch.Tensor]:
        """The weight of every matrix multiply a forward runs: the projections and the head (the token
        embedding when tied); what kernels.inference_layout lays out."""
        found = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        if self.lm_head is None:
            found.append(self.tok_emb.weight)
        return found

    # --- sizes -------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.config.positions == "learned":
                n -= self.pos_emb.weight.numel()
        return n


LOSS_SLICE = 1 << 23  # logits per slice of the checkpointed loss: 32 MiB in float32


def _slice_loss_sum(x, head, targets):
    return F.cross_entropy(F.linear(x, head).float(), targets, ignore_index=-100, reduction="sum")


def _checkpointed_loss(x, head, targets, reduction: str = "mean"):
    """The mean cross-entropy of x (B, T, C) through the head (V, C), computed in slices of rows of at most
    LOSS_SLICE logits, each recomputed in the backward: the (B, T, V) logits, their log-softmax and its gradient
    (three times B T V floats, 1.2 GiB for 8 x 256 tokens of GPT-2's vocabulary) never exist at once. The same
    value as the plain loss up to the order of the sum."""
    from torch.utils.checkpoint import checkpoint

    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    rows = max(1, LOSS_SLICE // head.size(0))
    total = sum(checkpoint(_slice_loss_sum, x[i:i + rows], head, targets[i:i + rows], use_reentrant=False)
                for i in range(0, x.size(0), rows))
    return total if reduction == "sum" else total / (targets != -100).sum()


def count_params(cfg: ModelConfig) -> int:
    """Parameter count of a config, without building its tensors."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Analytic FLOPs per token (PaLM appendix B convention).

    Forward: 2 FLOPs per weight of every matrix multiply (the head included,
    embeddings' lookups excluded) plus 4 * n_layer * T * n_embd for QK^T and AV
    over a context of T. Training (forward + backward) is 3x the forward.
    """
    T = seq_len or cfg.block_size
    C, L, F_ = cfg.n_embd, cfg.n_layer, cfg.intermediate_size
    kv = cfg.n_kv_head * cfg.head_dim
    attn = C * C * 2 + 2 * C * kv  # q, o, k, v
    mlp = C * F_ * (3 if cfg.mlp == "swiglu" else 2)
    matmul_params = L * (attn + mlp) + C * cfg.vocab_size
    forward = 2 * matmul_params + 4 * L * T * C
    return float(3 * forward if training else forward)


@torch.no_grad()
def random_token_loss(model: GPT, batch_size: int = 4, seq_len: int = 128, seed: int = 0) -> float:
    """Mean cross-entropy of the model on uniformly random tokens.

    A freshly initialised model should score close to ln(V) (LBDL 3.2): a
    first check that the forward pass and the initialisation are sound.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    T = min(seq_len, cfg.block_size)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, T + 1), generator=g)
    idx = idx.to(model.tok_emb.weight.device)
    was_training = model.training
    model.eval()
    loss = model(idx[:, :-1], targets=idx[:, 1:]).item()
    model.train(was_training)
    return loss
