"""Quantizing a model directory, the quantization sweep, calibration from a text file (layer 8).

    from lbdl_cli.quantize import QuantizeConfig, SweepConfig, quantize_dir, run_sweep
    quantize_dir("models/default", "out/q4_k", QuantizeConfig(type="q4_k", recipe="m"))
    result = run_sweep("models/default", "val.txt", SweepConfig(types=("q8_0", "q4_0")), out="sweep")

`quant/` is the runtime (formats, QuantLinear) and the pure planning (`quant.recipe`: which tensor gets
which type); this module does the work on model directories: loading, reading the calibration text,
writing the quantized directory, scoring every variant of the sweep.

The sweep runs each model once. The reference's log-probabilities on the scored positions are kept from
its own perplexity pass (llama.cpp's --kl-divergence-base), and each variant's one forward gives both its
perplexity (`lbdl_cli.evaluate.perplexity` itself, so the numbers are those `lbdl eval` gives) and its KL
divergence from the reference.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quant.catalog import (
    DEFAULT_EMBEDDINGS,
    EMBEDDING_CHOICES,
    RECIPES,
    TYPES,
    QuantError,
    check_embeddings,
    check_recipe,
    type_name,
)
from tokenizer.config import TOKENIZER_FILE

from .atomic import atomic_dir, check_out
from .checkpoint.configs import CONFIG_FILE, WEIGHTS_FILE
from .config import MAX_TOKENS, Config, dtype_setting, setting
from .errors import ConfigError, DataError
from .evaluate import perplexity, scoring_inputs, windows
from .files import read_text
from .progress import Progress, report

if TYPE_CHECKING:  # torch and the quantized runtime load inside the functions: the CLI imports the configs
    import torch

    from quant.recipe import Plan

CALIBRATED_KINDS = ("legacy", "kquant")  # formats whose scale search takes an importance vector
REFERENCE_BYTES = 512 << 20  # the reference's full log-probabilities are kept up to this size...
TOP_K = 64  # ...beyond it, its top-k log-probabilities per position and the rest's mass
PLOT_EXTRA = "the sweep's plot needs matplotlib: pip install 'lbdl[plot]'"

_TYPES = TYPES
_CALIBRATE_HELP = "Text file: importance weights from squared input activations (imatrix) guide the scale search."
_EMBEDDINGS_HELP = "Type of the token embeddings and head: a type, 'same' (the base type) or 'keep' (full precision)."


def _names(values, check) -> tuple[str, ...]:
    """Canonical names, commas split (`--types q4_0,q8_0` and repeated flags alike), repeats dropped."""
    out = []
    for part in (p.strip() for value in values for p in str(value).split(",")):
        if part and (name := check(part)) not in out:
            out.append(name)
    return tuple(out)


def _path(value) -> str | None:
    return None if value is None else os.fspath(value)


def _set(cfg, name: str, value) -> None:
    object.__setattr__(cfg, name, value)  # __post_init__'s normalisation of a frozen dataclass


@dataclass(frozen=True)
class QuantizeConfig(Config):
    """`lbdl quantize MODEL --type T --out DIR`: one type and recipe for a whole model directory."""

    RENAMED = {"ctx": "context"}

    type: str | None = setting(None, "Quantization type (required).", choices=_TYPES)
    recipe: str = setting("pure", "Which tensors get the next type up: " +
                          "; ".join(f"{k}: {v}" for k, v in RECIPES.items()) + ".", choices=tuple(RECIPES))
    embeddings: str = setting(DEFAULT_EMBEDDINGS, _EMBEDDINGS_HELP, choices=EMBEDDING_CHOICES + _TYPES)
    calibrate: str | None = setting(None, _CALIBRATE_HELP, metavar="FILE")
    context: int | None = setting(None, "Calibration window in tokens (default: the model's context).", low=1,
                                  high=MAX_TOKENS)

    def __post_init__(self):
        if self.type is None:
            raise ConfigError(f"{self.config_name()}: type is required; choose one of {', '.join(_TYPES)} (--type)")
        _set(self, "type", type_name(self.type))
        _set(self, "recipe", check_recipe(self.recipe))
        _set(self, "embeddings", check_embeddings(self.embeddings))
        _set(self, "calibrate", _path(self.calibrate))
        super().__post_init__()


@dataclass(frozen=True)
class SweepConfig(Config):
    """`lbdl quantize sweep MODEL --eval FILE`: which variants to score, and how."""

    RENAMED = {"ctx": "context", "dtype": "compute_dtype"}

    types: tuple[str, ...] = setting((), "Types to try, comma-separated or repeated (default: all).", choices=_TYPES)
    recipes: tuple[str, ...] = setting((), "Recipes to try, comma-separated or repeated (default: all).",
                                       choices=tuple(RECIPES))
    embeddings: str = setting(DEFAULT_EMBEDDINGS, _EMBEDDINGS_HELP, choices=EMBEDDING_CHOICES + _TYPES)
    calibrate: str | None = setting(None, "Text file: also quantize each type with importance weights and report "
                                          "the share of the perplexity increase they remove.", metavar="FILE")
    context: int | None = setting(None, "Evaluation window in tokens (default: the model's context).", low=4,
                                  high=MAX_TOKENS)
    batch_size: int = setting(8, "Windows per forward pass.", low=1, high=1 << 16)
    compute_dtype: str = dtype_setting("Precision of the reference and of every variant's unquantized parts: "
                                       "auto (as stored) | float32 | bfloat16.")

    def __post_init__(self):
        _set(self, "types", _names(self.types, type_name))
        _set(self, "recipes", _names(self.recipes, check_recipe))
        _set(self, "embeddings", check_embeddings(self.embeddings))
        _set(self, "calibrate", _path(self.calibrate))
        super().__post_init__()


# --- calibration from a text file ------------------------------------------------------------------


def read_calibration_ids(model_dir: str | os.PathLike, path: str | os.PathLike, ctx: int) -> list[int]:
    """The token ids of a calibration text, encoded with the model directory's tokenizer."""
    from .checkpoint import model_tokenizer

    text = read_text(path, "calibration file")
    ids = model_tokenizer(model_dir).encode(text)
    if len(ids) < ctx:
        raise DataError(f"calibration text {path} has {len(ids)} tokens, fewer than one window of {ctx}; "
                        f"use a longer text or a smaller --context")
    return ids


def collect_importance(model, model_dir: str | os.PathLike, path: str | os.PathLike,
                       ctx: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Importance vectors of a loaded full-precision model from a calibration text file."""
    from quant.calibrate import importance_from_ids

    ctx = ctx or model.config.block_size
    ids = read_calibration_ids(model_dir, path, ctx)
    importance, info = importance_from_ids(model, ids, ctx)
    return importance, {"file": str(path), **info}


def refuse_quantized(config: dict, where) -> None:
    q = config.get("quantization")
    if q:
        raise QuantError(f"{where} is already quantized ({q.get('name', q.get('type', '?'))}); "
                         f"quantize the full-precision model it came from instead")


# --- a model directory -----------------------------------------------------------------------------


def quantize_dir(model: str | os.PathLike, out: str | os.PathLike, cfg: QuantizeConfig, force: bool = False,
                 progress: Progress | None = None) -> dict:
    """Quantize a model directory into `out` (atomically). Returns what was done, for the CLI."""
    import torch

    from quant.formats import quantize
    from quant.recipe import plan, quantization_section, summarize, tensor_bytes

    from .checkpoint import SAFETENSORS_DTYPES, dir_size, load_model, model_config, read_config, write_model

    config = read_config(model)
    refuse_quantized(config, model)
    check_out(out, force, inputs=(model, cfg.calibrate))
    start = time.perf_counter()
    fp_model, config = load_model(model)
    state = fp_model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    p = plan(shapes, cfg.type, cfg.recipe, cfg.embeddings)
    importance = calibration = None
    if cfg.calibrate is not None:
        importance, calibration = collect_importance(fp_model, model, cfg.calibrate, ctx=cfg.context)
    dtype_sizes = {k: v.element_size() for k, v in state.items()}
    out_state, done = {}, 0
    report(progress, "quantizing", 0, len(p.types), unit="tensors")
    with torch.no_grad():
        for name, t in state.items():
            if name in p.types:
                imp = importance.get(name) if importance else None
                out_state[name] = quantize(t, p.types[name], name=name, importance=imp)
                done += 1
                report(progress, "quantizing", done, len(p.types), unit="tensors", status=name)
            else:
                out_state[name] = t
    del fp_model
    stats = summarize(shapes, dtype_sizes, p.types)
    sections = {k: v for k, v in config.items() if k not in ("format_version", "model", "quantization")}
    sections["quantization"] = quantization_section(p, stats, source=str(model), calibration=calibration)
    tok = Path(model) / TOKENIZER_FILE
    with atomic_dir(out, force=force, inputs=(model, cfg.calibrate)) as tmp:
        write_model(tmp, model_config(config, Path(model) / CONFIG_FILE), out_state,
                    tokenizer=tok if tok.is_file() else None, sections=sections)
    original = sum(tensor_bytes(k, s, dtype_sizes[k], {}) for k, s in shapes.items())
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}  # float32 -> F32, as `lbdl info` shows it
    return {"out": str(out), "name": p.name, "type": p.qtype, "recipe": p.recipe, "embeddings": p.embeddings,
            **stats, "original_bytes": original, "size_bytes": dir_size(Path(out)),
            "tensors": [{"name": k, "type": p.types.get(k, names.get(state[k].dtype, str(state[k].dtype))),
                         "shape": list(shapes[k]), "bytes": tensor_bytes(k, shapes[k], dtype_sizes[k], p.types)}
                        for k in shapes],
            "kept": p.kept, "calibration": calibration, "seconds": time.perf_counter() - start}


# --- the reference's log-probabilities, and scoring a model against them ---------------------------------


class Reference:
    """The reference model's perplexity and its log-probabilities on the positions perplexity scores.

    Made by one perplexity pass of the reference (`evaluate.perplexity`, llama.cpp's convention); `score`
    then runs one pass of another model and returns its perplexity statistics (exactly what
    `evaluate.perplexity` returns) with `kld`, the mean KL(P_ref || P_model) in nats per scored token,
    and `same_top`, the share of scored tokens where both models rank the same token first.

    The full log-probabilities are kept when they fit in `budget` bytes; the KL divergence is then
    computed as llama.cpp's --kl-divergence does. Beyond the budget only the `top_k` most likely tokens
    of each position are kept, with the probability mass of the rest, and KL is computed over k + 1
    outcomes, the rest lumped as one: a lower bound of the full KL (merging outcomes never increases
    it, by the log-sum inequality), close to it when the top k hold nearly all the mass. `same_top`
    is exact either way (the reference's first token is kept).
    """

    def __init__(self, model, ids, ctx: int, batch_size: int = 8, budget: int = REFERENCE_BYTES, top_k: int = TOP_K,
                 **byte_args):
        self.ids, self.ctx, self.batch_size, self.byte_args = ids, ctx, batch_size, byte_args
        vocab = model.config.vocab_size
        positions = sum(ctx - first - 1 for _, first in windows(len(ids), ctx))  # the positions perplexity scores
        self.full = positions * vocab * 4 <= budget
        self.top_k = None if self.full else min(top_k, vocab)
        self.batches: list[tuple] = []
        self.result = perplexity(model, ids, ctx, batch_size=batch_size, on_logits=self._keep, **byte_args)
        self.nbytes = sum(t.numel() * t.element_size() for b in self.batches for t in b)

    def _keep(self, logits) -> None:
        import torch.nn.functional as F

        lp = F.log_softmax(logits.float(), dim=-1)
        top1 = lp.argmax(-1)
        if self.full:
            self.batches.append((lp, top1))
            return
        top, idx = lp.topk(self.top_k, dim=-1)
        rest = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # log of the mass outside the top k
        self.batches.append((top, idx.int(), rest, top1))

    def score(self, model) -> dict:
        """One pass of `model`: its perplexity statistics, kld and same_top against the reference."""
        import torch
        import torch.nn.functional as F

        sums = {"kl": 0.0, "same": 0, "count": 0, "batch": 0}

        def compare(logits) -> None:
            lq = F.log_softmax(logits.float(), dim=-1)
            kept = self.batches[sums["batch"]]
            sums["batch"] += 1
            if self.full:
                lp, top1 = kept
                sums["kl"] += float((lp.exp() * (lp - lq)).sum())
            else:
                top, idx, rest, top1 = kept
                idx = idx.long()
                q_top = lq.gather(-1, idx).double()
                q_rest = lq.scatter(-1, idx, float("-inf")).logsumexp(-1).double()
                p_rest = rest.double().exp()
                kl = (top.double().exp() * (top.double() - q_top)).sum(-1)
                kl += torch.where(p_rest > 0, p_rest * (rest.double() - q_rest), 0.0)
                sums["kl"] += float(kl.sum())
            sums["same"] += int((top1 == lq.argmax(-1)).sum())
            sums["count"] += top1.numel()

        result = perplexity(model, self.ids, self.ctx, batch_size=self.batch_size, on_logits=compare, **self.byte_args)
        if sums["batch"] != len(self.batches):
            raise RuntimeError("the reference and the model were scored in different batches")
        return {**result, "kld": sums["kl"] / sums["count"], "same_top": sums["same"] / sums["count"]}

    def describe(self) -> dict:
        """How the reference was kept (for the sweep's result)."""
        return {"logprobs": "full" if self.full else f"top {self.top_k} and the rest's mass (KL a lower bound)",
                "top_k": self.top_k, "bytes": self.nbytes}


# --- the sweep -------------------------------------------------------------------------------------


def run_sweep(model: str | os.PathLike, eval_file: str | os.PathLike, cfg: SweepConfig | None = None,
              out: str | os.PathLike | None = None, force: bool = False, progress: Progress | None = None) -> dict:
    """Perplexity, KL divergence and size of `model` quantized every way `cfg` asks for, against its
    full-precision self (LBDL figure 8.2).

    Returns {"baseline": row, "rows": [row, ...], ...}; a row has name, type, recipe, calibrated,
    bits_per_weight, size_bytes, perplexity, std_error, kld, same_top, bits_per_byte, delta and delta_pct.
    Each variant is quantized in memory from the same full-precision model and scored through the real
    runtime (QuantLinear and its packed kernels) in one pass against the reference kept by `Reference`.
    With `cfg.calibrate`, every affine type is also quantized with importance weights from that text, and
    its row says which share of the round-to-nearest row's perplexity increase (and KL divergence)
    calibration removed. With `out`, sweep.json, sweep.md and sweep.png are written there atomically.
    """
    from quant.formats import FORMATS
    from quant.linear import quantize_model
    from quant.recipe import summarize

    from .checkpoint import load_model, model_tokenizer, read_config

    cfg = cfg or SweepConfig()
    types = list(cfg.types or TYPES)
    recipes = list(cfg.recipes or RECIPES)
    if out is not None:
        check_out(out, force, inputs=(model, eval_file))
        _need_matplotlib()
    config = read_config(model)
    refuse_quantized(config, model)
    text = read_text(eval_file)
    ids, byte_args = scoring_inputs(model_tokenizer(model, config), text)
    base, _ = load_model(model, dtype=cfg.compute_dtype)
    ctx = cfg.context or base.config.block_size

    importance = calibration = None
    if cfg.calibrate is not None:
        importance, calibration = collect_importance(base, model, cfg.calibrate, ctx=ctx)
    state = base.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    sizes = {k: v.element_size() for k, v in state.items()}  # the reference, as loaded
    stored = _stored_sizes(Path(model), sizes)  # a quantized directory keeps the other tensors as stored
    plans = _plans(shapes, types, recipes, cfg.embeddings)
    variants = [(p, calibrated) for p in plans
                for calibrated in ((False, True) if importance is not None and FORMATS[p.qtype].kind in
                                   CALIBRATED_KINDS else (False,))]
    start = time.perf_counter()
    report(progress, "sweep", 0, len(variants), unit="variants", status="reference")
    try:
        reference = Reference(base, ids, ctx, batch_size=cfg.batch_size, **byte_args)
    except DataError as e:
        raise DataError(f"{eval_file}: {e}") from None
    ref = reference.result
    dtype = str(next(base.parameters()).dtype).replace("torch.", "")
    baseline = _row(dtype.upper().replace("FLOAT", "F"), dtype, "-", False, summarize(shapes, sizes, {}),
                    {**ref, "kld": 0.0, "same_top": 1.0}, ref)
    rows = []
    for p, calibrated in variants:
        name = p.name + ("+imatrix" if calibrated else "")
        report(progress, "sweep", len(rows), len(variants), unit="variants", status=name)
        m = quantize_model(copy.deepcopy(base), p.types, importance=importance if calibrated else None)
        res = reference.score(m)
        del m
        row = _row(name, p.qtype, p.recipe, calibrated, summarize(shapes, stored, p.types), res, ref)
        if calibrated:  # the share of round-to-nearest's damage that calibration removes
            rtn = rows[-1]
            gap = rtn["perplexity"] - ref["perplexity"]
            row["removed"] = (rtn["perplexity"] - row["perplexity"]) / gap if gap > 0 else None
            row["kld_removed"] = (rtn["kld"] - row["kld"]) / rtn["kld"] if rtn["kld"] > 0 else None
        rows.append(row)
    report(progress, "sweep", len(rows), len(variants), unit="variants")
    result = {"model": str(model), "eval": str(eval_file), "ctx": ctx, "tokens": ref["tokens"],
              "embeddings": cfg.embeddings, "baseline": baseline, "rows": rows, "calibration": calibration,
              "reference": reference.describe(), "seconds": time.perf_counter() - start}
    if out is not None:
        result["files"] = write_sweep(result, out, force=force)
    return result


def _plans(shapes: dict, types: list[str], recipes: list[str], embeddings: str) -> list[Plan]:
    """One plan per type and recipe, those that give the same types as an earlier one left out."""
    from quant.recipe import plan

    plans, seen = [], set()
    for t in types:
        for r in recipes:
            p = plan(shapes, t, r, embeddings)
            key = tuple(sorted(p.types.items()))
            if key not in seen:
                seen.add(key)
                plans.append(p)
    return plans


def _stored_sizes(model: Path, loaded: dict[str, int]) -> dict[str, int]:
    from .checkpoint import SAFETENSORS_DTYPES, tensor_dtypes

    nbytes = {k: v.itemsize for k, v in SAFETENSORS_DTYPES.items()}
    dtypes = tensor_dtypes(model / WEIGHTS_FILE)
    return {k: nbytes.get(dtypes.get(k, ""), v) for k, v in loaded.items()}


def _row(name, qtype, recipe, calibrated, stats, res, ref) -> dict:
    return {"name": name, "type": qtype, "recipe": recipe, "calibrated": calibrated,
            "bits_per_weight": stats["bits_per_weight"], "size_bytes": stats["weights_bytes"],
            "perplexity": res["perplexity"], "std_error": res["std_error"],
            "kld": res["kld"], "same_top": res["same_top"], "bits_per_byte": res.get("bits_per_byte"),
            "delta": res["perplexity"] - ref["perplexity"],
            "delta_pct": 100 * (res["perplexity"] / ref["perplexity"] - 1)}


def write_sweep(result: dict, out: str | os.PathLike, force: bool = False) -> list[str]:
    """sweep.json, sweep.md and sweep.png of a sweep's result, written into `out` atomically."""
    with atomic_dir(out, force=force) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "sweep.md").write_text(markdown_table(result) + "\n", encoding="utf-8")
        plot_sweep(result, tmp / "sweep.png")
    return [str(Path(out) / name) for name in ("sweep.json", "sweep.md", "sweep.png")]


def _need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(PLOT_EXTRA) from None
    return matplotlib


def plot_sweep(result: dict, path: str | os.PathLike) -> Path:
    """Perplexity (left, LBDL figure 8.2 style) and KL divergence from the reference (right) against
    size: a line through the pure types, markers for the mixed recipes, crosses for calibrated ones."""
    _need_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    mib = 2.0 ** 20
    base = result["baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    markers = {"pure": "o", "s": "s", "m": "D", "l": "^"}
    for ax, key in zip(axes, ("perplexity", "kld")):
        for recipe in RECIPES:
            pts = sorted((r for r in result["rows"] if r["recipe"] == recipe and not r["calibrated"]),
                         key=lambda r: r["size_bytes"])
            if pts:  # a line through the pure types (smallest to largest), markers for the mixed recipes
                ax.plot([r["size_bytes"] / mib for r in pts], [r[key] for r in pts], marker=markers[recipe],
                        linewidth=1 if recipe == "pure" else 0, markersize=4 if recipe == "pure" else 5,
                        label=f"recipe {recipe}")
        cal = [r for r in result["rows"] if r["calibrated"]]
        if cal:
            ax.scatter([r["size_bytes"] / mib for r in cal], [r[key] for r in cal], marker="x", color="k", zorder=3,
                       label="with imatrix")
        for r in result["rows"]:
            if r["recipe"] == "pure" and not r["calibrated"]:
                ax.annotate(r["type"].upper(), (r["size_bytes"] / mib, r[key]), textcoords="offset points",
                            xytext=(3, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("model size (MiB, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].scatter([base["size_bytes"] / mib], [base["perplexity"]], marker="*", s=120, color="tab:red", zorder=3,
                    label=f"{base['name']} (unquantized)")
    axes[0].axhline(base["perplexity"], color="tab:red", linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("perplexity")
    axes[0].set_title("perplexity against size")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"KL divergence from {base['name']} (nats/token, log scale)")
    axes[1].set_title("how far quantization moves the predictions")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Quantization of {Path(result['model']).name}: {result['tokens']} tokens, context {result['ctx']}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_table(result: dict) -> str:
    """The sweep as a markdown table (what docs/BENCHMARKS.md shows)."""
    cal = bool(result.get("calibration"))
    head = ("| variant | bits/weight | size (MiB) | perplexity | change | KL divergence | same top token |"
            + (" removed (ppl / KLD) |" if cal else ""))
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cal else "")]
    for r in [result["baseline"], *result["rows"]]:
        line = (f"| {r['name']} | {r['bits_per_weight']:.2f} | {r['size_bytes'] / 2**20:.2f} "
                f"| {r['perplexity']:.3f} ± {r['std_error']:.3f} | {r['delta_pct']:+.2f}% | {r['kld']:.5f} "
                f"| {100 * r['same_top']:.1f}% |")
        if cal:
            if r.get("calibrated"):
                ppl = f"{100 * r['removed']:.0f}%" if r.get("removed") is not None else "-"
                kld = f"{100 * r['kld_removed']:.0f}%" if r.get("kld_removed") is not None else "-"
                line += f" {ppl} / {kld} |"
            else:
                line += " |"
        lines.append(line)
    return "\n".join(lines)
