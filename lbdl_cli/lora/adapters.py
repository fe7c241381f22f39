"""LoRA adapters (LBDL 8.3; Hu et al. 2021) and their PEFT directory format.

A targeted linear layer computes x (W + s B A)^T: the frozen base W through the base layer's own forward
(lbdl's `Linear` or a quantized `QuantLinear`, so the CPU kernels stay in use), plus s (x A^T) B^T with A (R x D)
random and B (C x R) zero, so the adapted model starts exactly equal to the base. s = alpha / R, or alpha / sqrt(R)
with rsLoRA. Only A and B train (float32).

    report = apply_lora(model, LoRAConfig(rank=8, alpha=16))   # q/k/v/o of every block
    save_adapter(model, cfg, "adapter", base_dir="run/best")     # PEFT: adapter_config.json + safetensors
    load_adapter(fresh_model, "adapter", base_dir="run/best")
    merge_lora(model); remove_lora(model)                        # W' = W + s B A, back to plain layers

The PEFT file names each pair by the module path of the base's Hugging Face export
(`base_model.model.<hf module>.lora_A.weight`). GPT-2 fuses q, k and v into one `c_attn` matrix: the adapters of
the three become one pair there, A stacked (rank R per adapted part) and B block-diagonal, with PEFT's
`rank_pattern` / `alpha_pattern` giving c_attn the same scale; a c_attn pair written by another tool is loaded as
one shared A for q, k and v and B's rows split between them (the same product).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from quant.linear import QuantLinear

from ..atomic import atomic_dir
from ..checkpoint import WEIGHTS_FILE, open_safetensors, save_tensors, write_json
from ..checkpoint.hf import FAMILIES
from ..errors import CheckpointError, ConfigError
from ..files import file_sha256, read_json
from ..model import Linear
from .config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ALL_LINEAR, PEFT_PREFIX, LoRAConfig, lora_scale

# --- the adapted layer -------------------------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear))


class LoRALinear(nn.Module):
    """base_layer(x) + s (dropout(x) A^T) B^T; the base is frozen and called through its own forward.

    `merge()` folds s B A into the base's weight (a QuantLinear base becomes a float `Linear` holding the
    dequantized weight plus the update; the quantized layer is kept and comes back, bytes unchanged, on
    `unmerge()`). Both are idempotent through the `merged` flag."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "gaussian"):
        super().__init__()
        if not is_linear(base):
            raise ConfigError(f"LoRA wraps linear layers, not {type(base).__name__}")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = lora_scale(alpha, rank, rslora)
        device = base.device if isinstance(base, QuantLinear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        if init == "kaiming":  # PEFT's default: nn.Linear's own initialisation
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:  # PEFT's init_lora_weights="gaussian"
            nn.init.normal_(self.lora_A, std=1 / rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._quantized = None  # the QuantLinear base while merged into a float Linear

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()  # (..., R) then (..., C)
        return y + (self.scale * h).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """s B A (C x D), float32."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        base = self.base_layer
        quantized = isinstance(base, QuantLinear)
        weight = base.dequantize(torch.float32) if quantized else base.weight.detach()
        merged = (weight.float() + self.delta()).to(base.dtype if quantized else weight.dtype)
        if not torch.isfinite(merged).all():  # refuse before anything changes
            raise CheckpointError(f"merging the adapter gives non-finite weights (lora_B max |{self._max_B():g}|); "
                                  f"the adapter is broken: retrain it or load another")
        if quantized:  # the float twin of the quantized layer, its bias shared
            linear = Linear(self.in_features, self.out_features, bias=base.bias is not None, device=merged.device,
                            dtype=merged.dtype)
            linear.weight.copy_(merged)
            if base.bias is not None:
                linear.bias = base.bias
            self._quantized, self.base_layer = base, linear.requires_grad_(False)
        else:
            base.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._quantized is not None:
            self.base_layer, self._quantized = self._quantized, None
        else:
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta()).to(weight.dtype))
        self.merged = False

    def _max_B(self) -> float:
        return self.lora_B.detach().abs().max().item()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


# --- adapting a model ----------------------------------------------------------------------------------------------


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of every linear layer the model computes with (lbdl Linear or QuantLinear)."""
    return {name: m for name, m in model.named_modules() if is_linear(m)}


def _matches(pattern: str, path: str) -> bool:
    """A target names a module (its last parts: q_proj, attn.q_proj), a path, or a glob over paths."""
    return path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern)


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The paths of the linear layers `targets` selects; a pattern that matches none is refused by name."""
    layers = list(linear_layers(model))
    if ALL_LINEAR in targets:
        return [n for n in layers if n != "lm_head"]
    chosen = set()
    for pattern in targets:
        hits = [n for n in layers if _matches(pattern, n)]
        if not hits:
            names = sorted({n.rpartition(".")[2] for n in layers})
            raise ConfigError(f"LoRA target {pattern!r} matches no linear layer; the model's are {', '.join(names)} "
                              f"(paths such as {layers[0]}), or all-linear")
        chosen.update(hits)
    return [n for n in layers if n in chosen]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a quantized weight counts as its out x in numbers."""
    from quant.linear import QuantModule

    total = sum(p.numel() for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantModule))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _report(model: nn.Module) -> dict:
    trainable, total = count_params(model)
    return {"trainable_params": trainable, "total_params": total, "share": trainable / total if total else 0.0,
            "modules": list(lora_modules(model))}


def _adapt(model: nn.Module, specs: dict[str, tuple[int, float, bool]], dropout: float, init: str,
           check_rank: bool = True) -> None:
    """Freeze the model, then wrap each named layer: {path: (rank, alpha, rslora)}."""
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; remove_lora(model) first")
    model.requires_grad_(False)
    layers = linear_layers(model)
    for name, (rank, _, _) in specs.items() if check_rank else ():
        out_f, in_f = layers[name].out_features, layers[name].in_features
        if rank > min(out_f, in_f):
            raise ConfigError(f"LoRA rank {rank} is larger than layer {name}'s smaller side ({out_f} x {in_f}); "
                              f"use a rank of at most {min(out_f, in_f)}")
    for name, (rank, alpha, rslora) in specs.items():
        _swap(model, name, LoRALinear(layers[name], rank, alpha, dropout, rslora, init))


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> dict:
    """Wrap the targeted layers in place (every other parameter frozen); {trainable_params, total_params, share,
    modules}."""
    names = resolve_targets(model, cfg.targets)
    _adapt(model, {n: (cfg.rank, cfg.alpha, cfg.rslora) for n in names}, cfg.lora_dropout, cfg.init)
    return _report(model)


def merge_lora(model: nn.Module) -> int:
    """Merge every adapter into its base weight (idempotent); the number of adapters."""
    found = lora_modules(model).values()
    for m in found:
        m.merge()
    return len(found)


def unmerge_lora(model: nn.Module) -> int:
    found = lora_modules(model).values()
    for m in found:
        m.unmerge()
    return len(found)


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the plain base layers back: a merged adapter stays in the weights (merge_lora first to keep it),
    an unmerged one is dropped. Base parameters stay frozen."""
    for name, m in lora_modules(model).items():
        _swap(model, name, m.base_layer)
    return model


def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy lora_state_dict's tensors back into the model's adapters, in place (the optimizer keeps its
    parameters): how a training run resumes."""
    found = lora_modules(model)
    names = {f"{n}.lora_{w}" for n in found for w in "AB"}
    if set(state) != names:
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise CheckpointError(f"the adapter state does not fit the model's adapters (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, m in found.items():
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {"<lbdl module path>.lora_A": A, ... .lora_B: B}."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


# --- the PEFT directory ----------------------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    cfg = model.config
    for arch, fam in FAMILIES.items():
        if not fam["fits"](cfg):
            return arch
    raise CheckpointError("the model fits no Hugging Face architecture lbdl exports, so its adapter has no PEFT "
                          "module names; see `lbdl export --to hf`")


def hf_modules(model: nn.Module) -> dict[str, list[str]]:
    """{Hugging Face module path: the lbdl linear layers it stacks, in order} (GPT-2's c_attn: q, k, v)."""
    arch, n_layer = _family(model), model.config.n_layer
    layers = {n for n, m in model.named_modules() if is_linear(m) or isinstance(m, LoRALinear)}
    out = {}
    for hf_name, names, _ in FAMILIES[arch]["table"]:
        if not hf_name.endswith(".weight"):
            continue
        for i in range(n_layer) if "{i}" in hf_name else [None]:
            parts = [n.format(i=i).removesuffix(".weight") for n in names]
            if all(p in layers for p in parts):
                out[hf_name.format(i=i).removesuffix(".weight")] = parts
    return out


def _short_targets(adapted: list[str], every: list[str]) -> list[str]:
    """PEFT target_modules: for each adapted module the shortest dotted suffix that selects only adapted ones."""
    out = set()
    for path in adapted:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(p in adapted for p in every if p == suffix or p.endswith("." + suffix)):
                out.add(suffix)
                break
    return sorted(out)


def base_sha256(base_dir: str | os.PathLike) -> str:
    """The content hash of a base model directory's weights (what an adapter records of its base)."""
    weights = Path(base_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{base_dir} has no {WEIGHTS_FILE}; give the base model directory")
    return file_sha256(weights)


def save_adapter(model: nn.Module, cfg: LoRAConfig, out: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                 force: bool = False, base_quantization: str | None = None) -> dict:
    """Write the PEFT adapter directory of the model's adapters (names of the base's Hugging Face export), with
    the content hash of `base_dir`'s model.safetensors and, for QLoRA, the quantization type the base was
    trained in (`base_quantization`), atomically; {out, tensors, target_modules}."""
    with atomic_dir(out, force=force, inputs=(base_dir,)) as tmp:
        result = write_adapter(model, cfg, tmp, base_dir, base_quantization)
    return {**result, "out": str(out)}


def write_adapter(model: nn.Module, cfg: LoRAConfig, dir: Path, base_dir: str | os.PathLike | None = None,
                  base_quantization: str | None = None) -> dict:
    """save_adapter's files, written into the existing directory `dir` (a training checkpoint's)."""
    found = lora_modules(model)
    if not found:
        raise ConfigError("the model has no LoRA adapters to save; apply_lora or load_adapter first")
    arch = _family(model)
    tensors, ranks, alphas, fused = {}, {}, {}, {}
    for hf, parts in hf_modules(model).items():
        adapters = [found.get(p) for p in parts]
        if not any(adapters):
            continue
        if len(parts) == 1:  # one lbdl layer, one PEFT pair
            m = adapters[0]
            A, B, rank, alpha = m.lora_A.detach(), m.lora_B.detach(), m.rank, m.alpha
            if (m.rank, m.alpha) != (cfg.rank, cfg.alpha):
                ranks[hf], alphas[hf] = m.rank, m.alpha
            if m.rslora != cfg.rslora:
                raise ConfigError(f"{parts[0]} has rslora={m.rslora} but the config {cfg.rslora}; PEFT has one flag")
        else:  # fused (c_attn): A stacked, B block-diagonal, alpha so that c_attn's scale is the first part's
            A, B, rank, alpha = _fuse([model.get_submodule(p) for p in parts], cfg.rslora)
            ranks[hf], alphas[hf] = rank, alpha
            fused[hf] = [[p, m.rank] for p, m in zip(parts, adapters) if m is not None]
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B.float().contiguous()
    adapted = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    targets = _short_targets(adapted, list(hf_modules(model)))
    base_sha = base_sha256(base_dir) if base_dir is not None else None
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": targets, "use_rslora": cfg.rslora, "bias": "none",
        "fan_in_fan_out": arch == "GPT2LMHeadModel",  # GPT-2's Conv1D stores (in, out)
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "rank_pattern": ranks, "alpha_pattern": alphas, "modules_to_save": None,
        "base_model_name_or_path": str(Path(base_dir).resolve()) if base_dir is not None else None,
        "lbdl_base_sha256": base_sha, "lbdl_base_quantization": base_quantization, "lbdl_architecture": arch,
        "lbdl_lora": cfg.to_dict(),
        "lbdl_fused": fused,  # {fused HF module: [[lbdl layer, its rank], ...]}: how load_adapter splits it back
    }
    save_tensors(tensors, Path(dir) / ADAPTER_WEIGHTS)
    write_json(Path(dir) / ADAPTER_CONFIG, config)
    return {"out": str(dir), "tensors": len(tensors), "target_modules": targets}


def _fuse(parts: list[nn.Module], rslora: bool):
    """(A, B, rank, alpha) of one PEFT pair equal to the stacked layers' updates: A the adapters' A stacked, B
    block-diagonal (a layer without adapter gives zero rows), alpha such that the pair's PEFT scale is the first
    adapter's (the others' B rescaled, exactly 1 when the scales agree)."""
    present = [m for m in parts if isinstance(m, LoRALinear)]
    if any(m.rslora != rslora for m in present):
        raise ConfigError("the adapters of one fused Hugging Face module must share rslora")
    rank, scale = sum(m.rank for m in present), present[0].scale
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    A = torch.cat([m.lora_A.detach().float() for m in present])
    B = torch.zeros(sum(m.out_features for m in parts), rank)
    row, col = 0, 0
    for m in parts:
        if isinstance(m, LoRALinear):
            B[row:row + m.out_features, col:col + m.rank] = m.lora_B.detach().float() * (m.scale / scale)
            col += m.rank
        row += m.out_features
    return A, B, rank, alpha


def _pattern(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT LoRA directory, checked for what lbdl can load."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}; give a PEFT adapter directory")
    config = read_json(path, "adapter config", error=CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; lbdl loads LORA")
    for key, plain in (("use_dora", False), ("bias", "none"), ("lora_bias", False), ("modules_to_save", None),
                       ("layers_to_transform", None)):
        if config.get(key, plain) not in (plain, [], {}):
            raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported by lbdl (plain LoRA only)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, got {value!r}")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (lbdl never loads adapter_model.bin)")
    with open_safetensors(weights) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                 force_base: bool = False) -> dict:
    """Wrap the model's layers with the adapters of a PEFT directory (lbdl's or PEFT's own) and load them.

    With `base_dir`, the hash lbdl recorded (lbdl_base_sha256) must be that of its model.safetensors unless
    `force_base`; every tensor's shape is checked against the model. Returns apply_lora's report and the
    `config` (a LoRAConfig)."""
    cfg, specs, weights = adapter_layers(model, adapter_dir, base_dir, force_base)
    _adapt(model, specs, cfg.lora_dropout, cfg.init, check_rank=False)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.copy_(weights[name][0])
            m.lora_B.copy_(weights[name][1])
    return {**_report(model), "config": cfg}


def adapter_deltas(model: nn.Module, adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                   force_base: bool = False) -> dict[str, torch.Tensor]:
    """{weight name of the model: s B A (out x in, float32)} of a PEFT directory: the adapter as a task vector.
    `model` only lends its layer names and shapes (a model built on the meta device will do)."""
    _, specs, weights = adapter_layers(model, adapter_dir, base_dir, force_base)
    return {f"{name}.weight": lora_scale(alpha, rank, rslora) * (weights[name][1] @ weights[name][0])
            for name, (rank, alpha, rslora) in specs.items()}


def adapter_layers(model: nn.Module, adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                   force_base: bool = False) -> tuple[LoRAConfig, dict, dict]:
    """(config, {lbdl layer: (rank, alpha, rslora)}, {lbdl layer: (A, B)}) of a PEFT directory, checked against
    the model's layers (see load_adapter)."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    recorded = config.get("lbdl_base_sha256")
    if base_dir is not None and recorded and not force_base:
        found = base_sha256(base_dir)
        if found != recorded:
            raise CheckpointError(f"{adapter_dir} was trained on another base (sha256 {recorded[:12]}, {base_dir} has "
                                  f"{found[:12]}); give its base, or --force-base if the architecture matches")
    rslora, dropout = bool(config.get("use_rslora")), float(config.get("lora_dropout") or 0.0)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    fused = config.get("lbdl_fused") or {}
    modules = hf_modules(model)
    # group the tensors by Hugging Face module: {hf: {"A": tensor, "B": tensor}}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if m is None or m.group(1) not in modules:
            raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} names no linear layer of this "
                                  f"{_family(model)} model (expected {PEFT_PREFIX}<module>.lora_A.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    specs, weights = {}, {}
    for hf, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: {hf} has lora_{''.join(pair)} without its pair")
        parts = [model.get_submodule(p) for p in modules[hf]]
        rank = _pattern(ranks, hf, config["r"])
        alpha = _pattern(alphas, hf, config["lora_alpha"])
        shapes = {"A": (rank, parts[0].in_features), "B": (sum(p.out_features for p in parts), rank)}
        for which, shape in shapes.items():
            if tuple(pair[which].shape) != shape:
                raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {PEFT_PREFIX}{hf}.lora_{which}.weight "
                                      f"has shape {list(pair[which].shape)} but this model needs {list(shape)}")
        A, B, scale = pair["A"].float(), pair["B"].float(), lora_scale(alpha, rank, rslora)
        rows = dict(zip(modules[hf], B.split([p.out_features for p in parts])))
        if len(parts) == 1:
            split = {modules[hf][0]: (A, B, rank)}
        elif hf in fused:  # lbdl's own: each layer takes back its block of A and B
            if not (isinstance(fused[hf], list) and all(isinstance(e, list) and len(e) == 2 and e[0] in rows
                                                        and isinstance(e[1], int) and e[1] > 0 for e in fused[hf])
                    and sum(e[1] for e in fused[hf]) == rank):
                raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: lbdl_fused entry of {hf} does not fit the "
                                      f"model ({fused[hf]!r})")
            split, col = {}, 0
            for name, r in fused[hf]:
                split[name] = (A[col:col + r], rows[name][:, col:col + r], r)
                col += r
        else:  # another tool's: every part shares A, B's rows split
            split = {name: (A, rows[name], rank) for name in modules[hf]}
        for name, (a, b, r) in split.items():  # the part's alpha keeps the pair's scale at its own rank
            specs[name] = (r, scale * (math.sqrt(r) if rslora else r), rslora)
            weights[name] = (a, b)
    lbdl = config.get("lbdl_lora")
    try:
        cfg = LoRAConfig.from_dict(lbdl) if isinstance(lbdl, dict) else LoRAConfig(
            rank=int(config["r"]), alpha=float(config["lora_alpha"]), lora_dropout=dropout, rslora=rslora,
            targets=tuple(specs))
    except ConfigError as e:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: {e}") from None
    return cfg, specs, weights


def merge_adapter_dir(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike,
                      force: bool = False, force_base: bool = False) -> dict:
    """MODEL with ADAPTER merged into its weights (W' = W + s B A), saved as a plain model directory of the base's
    architecture with its tokenizer; a quantized base is dequantized first (float32 out: quantize it again with
    `lbdl quantize`). Returns {out, merged, params, dequantized}."""
    from quant.linear import dequantize_model

    from ..atomic import check_out
    from ..checkpoint import TOKENIZER_FILE, load_model, save_model

    check_out(out, force, inputs=(model_dir, adapter_dir))
    model, config = load_model(model_dir, dtype=torch.float32)
    quantized = "quantization" in config
    if quantized:
        dequantize_model(model)
    load_adapter(model, adapter_dir, base_dir=model_dir, force_base=force_base)
    merged = merge_lora(model)
    remove_lora(model)
    sections = {k: v for k, v in config.items() if k not in ("format_version", "model", "quantization", "tokenizer")}
    sections["adapter"] = {"merged": str(adapter_dir), "base": str(model_dir), "base_quantized": quantized}
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    save_model(model, out, tokenizer=tokenizer if tokenizer.is_file() else None, sections=sections, force=force)
    return {"out": str(out), "merged": merged, "params": sum(p.numel() for p in model.parameters()),
            "dequantized": quantized}
