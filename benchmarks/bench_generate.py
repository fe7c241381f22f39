"""Generation and perplexity-evaluation speed: lbdl against Hugging Face transformers
on the same weights, measured in the same run on this machine.

    python benchmarks/bench_generate.py [--models micro,small,gpt2-124m] [--dtypes float32,bfloat16]
                                        [--new-tokens 256] [--prompt-tokens 128] [--repeats 5] [--threads N]

For each model shape a transformers GPT2LMHeadModel is built (random weights,
fixed seed), saved with `save_pretrained`, and imported with `lbdl import`, so
both sides run the very same weights. Generation: batch 1, greedy, a prompt of
--prompt-tokens random ids, exactly --new-tokens new tokens (EOS ignored).
lbdl runs `lbdl_cli.sample.generate` (what `lbdl generate` calls); transformers
runs `model.generate(...)` with a streamer that timestamps each token. On both
sides prefill = start -> first new token, decode = first -> last new token
(decode tokens/s = (new tokens - 1) / decode time). Perplexity evaluation:
`lbdl_cli.evaluate.perplexity` (llama.cpp convention) against the plain
transformers loop (forward the windows, cross-entropy on the second half) on
the same windows, batch 8. "matvec ceiling": the tokens/s of a step that only
multiplies one vector by each weight matrix (torch's kernels), the bound for
anything built on them when every weight must be read once per token. "memory
bound": the tokens/s of a step that only read every weight and the mean KV
cache once, at the speed torch sums a 256 MiB tensor in the same run: what no
implementation can beat on this machine. The lbdl and transformers runs
alternate within each repeat; every cell is the median of --repeats runs,
after one warm-up each.
Needs the `bench` extra (transformers).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import capabilities  # benchmarks/machine.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # GPT-2 family, as lbdl's presets of the same names (micro with a 512-token context, to fit 128 + 256)
    "micro": dict(n_layer=3, n_head=4, n_embd=128, vocab_size=4096, n_positions=512),
    "small": dict(n_layer=8, n_head=8, n_embd=512, vocab_size=4096, n_positions=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
}


def machine() -> str:
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{capabilities()}; {os.cpu_count()} cores, load average {load:.2f} at start; "
            f"Python {platform.python_version()}, transformers {transformers.__version__}")


class Stamps:
    """A transformers streamer that timestamps each put() (the first is the prompt)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def build(name: str, root: Path, seed: int = 0):
    import transformers

    from lbdl_cli.checkpoint.hf import import_hf

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[name]))
    hf.save_pretrained(root / f"{name}-hf")
    import_hf(root / f"{name}-hf", root / f"{name}-lbdl", force=True)
    params = sum(p.numel() for p in hf.parameters())
    del hf
    return root / f"{name}-hf", root / f"{name}-lbdl", params


def lbdl_generate(model, prompt, new_tokens):
    from lbdl_cli.sample import SamplingConfig, generate

    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    [g] = generate(model, None, [prompt], config)
    return g.prefill_s, g.decode_s, g.token_ids


def hf_generate(model, prompt, new_tokens, device):
    stamps = Stamps(device)
    x = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                             streamer=stamps)
    first, last = stamps.times[1], stamps.times[-1]
    return first - t0, last - first, out[0, len(prompt):].tolist()


def matvec_ceiling(model, repeats=30):
    """Tokens/s of a decode step that did nothing but multiply one vector by each weight matrix
    (the kernels lbdl's decoding picks, the weights as lbdl lays them out): the bound for any
    implementation built on those kernels when a step must read every weight once, as batch-1
    decoding does."""
    from lbdl_cli.kernels import linear

    mats = []
    for block in model.blocks:
        fused = block.attn.fused_qkv()
        mats += [fused[0]] if fused else [block.attn.q_proj.weight, block.attn.k_proj.weight, block.attn.v_proj.weight]
        mats += [block.attn.o_proj.weight] + [m.weight for m in block.mlp.children() if isinstance(m, torch.nn.Linear)]
    mats.append(model.lm_head.weight if model.lm_head is not None else model.tok_emb.weight)
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in mats}
    with torch.inference_mode():
        def step():
            for w in mats:
                linear(xs[w.shape[1]], w)
            if w.device.type == "cuda":
                torch.cuda.synchronize()
        step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return 1 / median(times)


def read_bandwidth(device, repeats=9) -> float:
    """Bytes/s at which torch reads a 256 MiB float32 tensor (a sum) with the threads it has:
    the memory speed of this machine in this run."""
    x = torch.ones(1 << 26, device=device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / median(times)


def bandwidth_bound(model, bandwidth, prompt_tokens, new_tokens) -> float:
    """Tokens/s of a decode step that read every weight matrix and the mean KV cache once at
    `bandwidth` and did nothing else: what no implementation can beat on this machine."""
    cfg = model.config
    weights = sum(w.numel() * w.element_size() for w in model.matrices())
    cache_len = prompt_tokens + new_tokens / 2
    w = model.tok_emb.weight
    kv_bytes = 4 if w.device.type == "cpu" else w.element_size()  # GPT.new_cache: float32 on CPUs
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * cache_len * kv_bytes
    return bandwidth / (weights + kv)


def lbdl_perplexity(model, ids, ctx, batch):
    from lbdl_cli.evaluate import perplexity

    r = perplexity(model, ids, ctx=ctx, batch_size=batch)
    return r["tokens_evaluated"] / r["seconds"], r["perplexity"]


def hf_perplexity(model, ids, ctx, batch, device):
    """The plain transformers loop: the same windows, all logits, cross-entropy on the second half."""
    n_windows = len(ids) // ctx
    first = ctx // 2
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n_windows, batch):
            x = torch.stack([ids[j * ctx:(j + 1) * ctx] for j in range(i, min(i + batch, n_windows))]).to(device)
            logits = model(x).logits[:, first:-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, first + 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, first + 1:].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return n_windows * ctx / seconds, float(torch.tensor(total / count).exp())


def median(xs):
    return statistics.median(xs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="micro,small,gpt2-124m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ppl-ctx", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-perplexity", action="store_true")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        if args.prompt_tokens + args.new_tokens > SHAPES[name]["n_positions"]:
            ap.error(f"{name}: prompt + new tokens pass its context of {SHAPES[name]['n_positions']}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.kernels import inference_layout

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    print(f"machine: {machine()}", flush=True)
    gen_rows, ppl_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            hf_dir, lbdl_dir, params = build(name, root)
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                ours, _ = load_model(lbdl_dir, dtype=dtype, device=device)
                inference_layout(ours.matrices())  # as `lbdl generate` loads a model (load_for_inference)
                theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
                g = torch.Generator().manual_seed(1)
                prompt = torch.randint(0, SHAPES[name]["vocab_size"], (args.prompt_tokens,), generator=g).tolist()
                lbdl_generate(ours, prompt, 8)  # warm-up
                hf_generate(theirs, prompt, 8, device)
                runs = {"lbdl": [], "hf": []}
                same = True
                for r in range(args.repeats):
                    order = ("lbdl", "hf") if r % 2 == 0 else ("hf", "lbdl")
                    for side in order:
                        if side == "lbdl":
                            pre, dec, toks = lbdl_generate(ours, prompt, args.new_tokens)
                        else:
                            pre, dec, toks = hf_generate(theirs, prompt, args.new_tokens, device)
                        runs[side].append((args.prompt_tokens / pre, (args.new_tokens - 1) / dec, toks))
                same = runs["lbdl"][0][2] == runs["hf"][0][2]
                row = {"model": f"{name} ({params / 1e6:.1f}M)", "dtype": dtype_name, "same_tokens": same}
                for side in ("lbdl", "hf"):
                    row[f"{side}_prefill"] = median([x[0] for x in runs[side]])
                    row[f"{side}_decode"] = median([x[1] for x in runs[side]])
                row["speedup"] = row["lbdl_decode"] / row["hf_decode"]
                row["ceiling"] = matvec_ceiling(ours)
                row["bound"] = bandwidth_bound(ours, read_bandwidth(device), args.prompt_tokens, args.new_tokens)
                gen_rows.append(row)
                print(f"  {row['model']} {dtype_name}: decode lbdl {row['lbdl_decode']:.1f} vs hf "
                      f"{row['hf_decode']:.1f} tok/s ({row['speedup']:.2f}x; matvec ceiling {row['ceiling']:.1f}, "
                      f"memory bound {row['bound']:.1f}), prefill lbdl {row['lbdl_prefill']:.0f} vs hf "
                      f"{row['hf_prefill']:.0f} tok/s, same tokens: {same}", flush=True)
                if not args.skip_perplexity:
                    ctx = min(args.ppl_ctx, SHAPES[name]["n_positions"])
                    ids = torch.randint(0, SHAPES[name]["vocab_size"], (ctx * args.ppl_windows,), generator=g)
                    lbdl_perplexity(ours, ids[: 2 * ctx], ctx, 8)  # warm-up
                    hf_perplexity(theirs, ids[: 2 * ctx], ctx, 8, device)
                    pr = {"lbdl": [], "hf": []}
                    for r in range(args.repeats):
                        pr["lbdl"].append(lbdl_perplexity(ours, ids, ctx, 8))
                        pr["hf"].append(hf_perplexity(theirs, ids, ctx, 8, device))
                    prow = {"model": row["model"], "dtype": dtype_name, "ctx": ctx, "tokens": len(ids),
                            "lbdl": median([x[0] for x in pr["lbdl"]]), "hf": median([x[0] for x in pr["hf"]]),
                            "ppl_lbdl": pr["lbdl"][0][1], "ppl_hf": pr["hf"][0][1]}
                    prow["speedup"] = prow["lbdl"] / prow["hf"]
                    ppl_rows.append(prow)
                    print(f"  perplexity {row['model']} {dtype_name}: lbdl {prow['lbdl']:.0f} vs hf {prow['hf']:.0f} "
                          f"tok/s; ppl {prow['ppl_lbdl']:.3f} vs {prow['ppl_hf']:.3f}", flush=True)
                del ours, theirs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.2f} at the end\n")
    print(f"Generation: batch 1, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; "
          f"median of {args.repeats} runs, tokens/s\n")
    print("| model | dtype | lbdl prefill | HF prefill | lbdl decode | HF decode | decode speed-up | "
          "matvec ceiling | ceiling / HF | memory bound | bound / HF | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in gen_rows:
        print(f"| {r['model']} | {r['dtype']} | {r['lbdl_prefill']:,.0f} | {r['hf_prefill']:,.0f} | "
              f"{r['lbdl_decode']:,.1f} | {r['hf_decode']:,.1f} | {r['speedup']:.2f}x | "
              f"{r['ceiling']:,.1f} | {r['ceiling'] / r['hf_decode']:.2f}x | {r['bound']:,.1f} | "
              f"{r['bound'] / r['hf_decode']:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")
    if ppl_rows:
        print(f"\nPerplexity evaluation: llama.cpp convention, batch 8; median of {args.repeats} runs, "
              f"tokens evaluated per second\n")
        print("| model | dtype | ctx | tokens | lbdl tokens/s | HF loop tokens/s | speed-up | perplexity lbdl / HF |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in ppl_rows:
            print(f"| {r['model']} | {r['dtype']} | {r['ctx']} | {r['tokens']:,} | {r['lbdl']:,.0f} | {r['hf']:,.0f} | "
                  f"{r['speedup']:.2f}x | {r['ppl_lbdl']:.3f} / {r['ppl_hf']:.3f} |")


if __name__ == "__main__":
    main()
