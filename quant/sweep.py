"""The quantization sweep: every type and recipe, its size and its perplexity (LBDL figure 8.2).

Each variant is quantized in memory from the same full-precision model and
evaluated through the real runtime (QuantLinear and its packed kernels) with
`lbdl_cli.evaluate.perplexity`, so the numbers are those `lbdl eval` gives
for the quantized directory.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from .formats import FORMATS, get_format
from .recipe import DEFAULT_EMBEDDINGS, RECIPES, check_embeddings, check_recipe, plan, refuse_quantized, summarize

CALIBRATED_KINDS = ("legacy", "kquant")  # formats whose scale search takes an importance vector


def sweep(model: str | os.PathLike, eval_file: str | os.PathLike, types=None, recipes=None,
          embeddings: str = DEFAULT_EMBEDDINGS, calibrate: str | os.PathLike | None = None, ctx: int | None = None,
          batch_size: int = 8, dtype=None, progress=None) -> dict:
    """Perplexity and size of `model` quantized every way asked for, against its full-precision self.

    Returns {"baseline": row, "rows": [row, ...], ...}; a row has name, type, recipe, calibrated,
    bits_per_weight, size_bytes, perplexity, std_error, delta and delta_pct. With `calibrate`, every
    affine type is also quantized with importance weights from that text, and its row says which
    share of the round-to-nearest row's perplexity increase calibration removed. `dtype` (e.g.
    "float32") is the precision of the reference model and of every variant's unquantized parts;
    None keeps the stored one.
    """
    from lbdl_cli.checkpoint import load_model, read_config
    from lbdl_cli.evaluate import perplexity, read_text, token_byte_lengths
    from lbdl_cli.errors import DataError
    from tokenizer import Tokenizer

    from .calibrate import collect_importance
    from .linear import quantize_model

    types = [get_format(t).name for t in (types or list(FORMATS))]
    recipes = [check_recipe(r) for r in (recipes or list(RECIPES))]
    embeddings = check_embeddings(embeddings)
    refuse_quantized(read_config(model), model)
    text = read_text(eval_file)
    tok = Tokenizer.load(model)
    ids = tok.encode(text)
    base, _ = load_model(model, dtype=dtype)
    ctx = ctx or base.config.block_size
    lengths = token_byte_lengths(tok)
    exact = sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    byte_args = {"token_bytes": lengths} if exact else {"n_bytes": len(text.encode("utf-8"))}

    def evaluate(m) -> dict:
        try:
            res = perplexity(m, ids, ctx, batch_size=batch_size, **byte_args)
        except DataError as e:
            raise DataError(f"{eval_file}: {e}") from None
        if m is not base:
            res.update(divergence(base, m, ids, ctx, batch_size=batch_size))
        return res

    importance = calibration = None
    if calibrate is not None:
        importance, calibration = collect_importance(base, Path(model), calibrate, ctx=ctx)
    state = base.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    sizes = {k: v.element_size() for k, v in state.items()}  # the reference, as loaded
    stored = _stored_sizes(Path(model), sizes)  # a quantized directory keeps the other tensors as stored
    start = time.perf_counter()
    ref = evaluate(base)
    dtype = str(next(base.parameters()).dtype).replace("torch.", "")
    fp = summarize(shapes, sizes, {})
    baseline = _row(dtype.upper().replace("FLOAT", "F"), dtype, "-", False, fp, ref, ref)
    plans, seen = [], set()
    for t in types:
        for r in recipes:
            p = plan(shapes, t, r, embeddings)
            key = tuple(sorted(p.types.items()))
            if key in seen:
                continue
            seen.add(key)
            plans.append(p)
    total = len(plans) * (2 if importance is not None else 1)
    rows = []
    for p in plans:
        variants = [False]
        if importance is not None and FORMATS[p.qtype].kind in CALIBRATED_KINDS:
            variants.append(True)
        for calibrated in variants:
            m = copy.deepcopy(base)
            quantize_model(m, p.types, importance=importance if calibrated else None)
            res = evaluate(m)
            del m
            row = _row(p.name + ("+imatrix" if calibrated else ""), p.qtype, p.recipe, calibrated,
                       summarize(shapes, stored, p.types), res, ref)
            if calibrated:  # the share of round-to-nearest's damage that calibration removes
                rtn = rows[-1]
                gap = rtn["perplexity"] - ref["perplexity"]
                row["removed"] = (rtn["perplexity"] - row["perplexity"]) / gap if gap > 0 else None
                row["kld_removed"] = (rtn["kld"] - row["kld"]) / rtn["kld"] if rtn["kld"] > 0 else None
            rows.append(row)
            if progress is not None:
                progress(len(rows), total)
    return {"model": str(model), "eval": str(eval_file), "ctx": ctx, "tokens": ref["tokens"], "embeddings": embeddings,
            "baseline": baseline, "rows": rows, "calibration": calibration,
            "seconds": time.perf_counter() - start}


def _stored_sizes(model: Path, loaded: dict[str, int]) -> dict[str, int]:
    from lbdl_cli.checkpoint import WEIGHTS_FILE, tensor_dtypes

    nbytes = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
    dtypes = tensor_dtypes(model / WEIGHTS_FILE)
    return {k: nbytes.get(dtypes.get(k, ""), v) for k, v in loaded.items()}


def divergence(base, model, ids, ctx: int, batch_size: int = 8) -> dict:
    """llama.cpp's `--kl-divergence` statistics of `model` against `base` on the perplexity windows.

    On the tokens perplexity scores (the second half of each window of ctx), the mean
    KL(P_base || P_model) in nats per token and the share of tokens where both models rank the
    same token first. Far less noisy than a perplexity difference: it measures only how much
    quantization moved the predictions.
    """
    import torch
    import torch.nn.functional as F

    from lbdl_cli.evaluate import MAX_LOGITS, windows

    ids = torch.as_tensor(ids, dtype=torch.long)
    plan = windows(len(ids), ctx)
    first = ctx // 2
    vocab = base.config.vocab_size
    rows = max(1, min(batch_size, MAX_LOGITS // ((ctx - first) * vocab)))
    device = base.tok_emb.weight.device
    kl_sum, same, count = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(plan), rows):
            x = torch.stack([ids[s:s + ctx] for s, _ in plan[i:i + rows]]).to(device)
            lp = F.log_softmax(base(x)[:, first:-1].float(), dim=-1)
            lq = F.log_softmax(model(x)[:, first:-1].float(), dim=-1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            count += lp.shape[0] * lp.shape[1]
    return {"kld": kl_sum / count, "same_top": same / count}


def _row(name, qtype, recipe, calibrated, stats, res, ref) -> dict:
    return {"name": name, "type": qtype, "recipe": recipe, "calibrated": calibrated,
            "bits_per_weight": stats["bits_per_weight"], "size_bytes": stats["weights_bytes"],
            "perplexity": res["perplexity"], "std_error": res["std_error"],
            "kld": res.get("kld", 0.0), "same_top": res.get("same_top", 1.0),
            "bits_per_byte": res.get("bits_per_byte"),
            "delta": res["perplexity"] - ref["perplexity"],
            "delta_pct": 100 * (res["perplexity"] / ref["perplexity"] - 1)}


def plot_sweep(result: dict, path: str | os.PathLike) -> Path:
    """Perplexity (left, LBDL figure 8.2 style) and KL divergence from the reference (right) against
    size: a line through the pure types, markers for the mixed recipes, crosses for calibrated ones."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from lbdl_cli.errors import ConfigError

        raise ConfigError("the sweep's plot needs matplotlib: pip install 'lbdl[plot]'") from None
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
    fig.suptitle(f"Quantization of {Path(result['model']).name}: {result['tokens']} tokens, ctx {result['ctx']}",
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
