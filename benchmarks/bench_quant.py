"""Quantization: size on disk, resident memory, decode speed and perplexity of each format.

    python benchmarks/bench_quant.py [--repeats 3] [--threads 1] [--new-tokens 64]
                                     [--model DIR] [--eval-chars 60000] [--figure docs/quant_sweep.png]

Speed and memory: a GPT-2-124M-shaped model (`lbdl init --preset gpt2-124m`,
random weights: speed does not depend on them) saved as fp32, bf16, and
quantized by `lbdl quantize` to Q8_0, Q4_0, Q4_1 and Q4_K (the error-minimising
type), each with the default recipe (pure, embeddings and tied head in Q8_0).
Every measurement is a fresh process that loads the directory with
`load_for_inference` (what `lbdl generate` does) and decodes with
`lbdl_cli.sample.generate` (greedy, batch 1, KV cache); variants are
interleaved, repeat by repeat, and each cell is the median of the repeats.
"Resident after load" is the growth of the process's RSS from before
`load_model` to after it with every tensor paged in (fp32 weights are mapped
from the file and only count once touched).

Perplexity: a trained model (the bundled default model, or --model) on the
held-out paragraphs of tinyshakespeare (data/tinyshakespeare-val.txt, or
--eval-file), each format quantized in memory and scored through the real
runtime (`lbdl_cli.quantize.run_sweep`, `lbdl_cli.evaluate.perplexity`,
llama.cpp's convention), with the KL divergence of its predictions from the
fp32 model's (llama.cpp's --kl-divergence; the fp32 log-probabilities are kept
once and each variant runs once). --figure also runs the full sweep (every
type and recipe, with and without an importance matrix from --calib-chars
characters of training paragraphs) and draws perplexity and KL divergence
against size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import capabilities  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
SPEED_VARIANTS = ("fp32", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q4_k/emb")  # q4_k/emb: embeddings q4_k too
PPL_TYPES = ("q8_0", "q4_0", "q4_1", "q4_k")


# --- one measurement, in its own process ------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def page_in(model) -> None:
    """Touch every page of every tensor the model holds (fp32 weights are mapped from the file lazily)."""
    import torch

    from quant.linear import quant_modules

    tensors = list(model.parameters()) + list(model.buffers())
    for m in quant_modules(model).values():
        tensors += m.runtime_tensors()
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)
            flat[:: max(1, 4096 // t.element_size())].float().sum()


def worker(model_dir: str, threads: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.model import GPT, ModelConfig
    from lbdl_cli.sample import SamplingConfig, generate, load_for_inference

    # warm-up: import-time and first-call allocations of torch and lbdl stay out of the memory figure
    tiny = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=64)).eval()
    with torch.inference_mode():
        tiny(torch.zeros(1, 4, dtype=torch.long))
    with torch.device("meta"):
        GPT(ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    before = rss_mb()
    start = time.perf_counter()
    model, _ = load_model(model_dir)  # memory: the model as loaded, every page in
    page_in(model)
    load_s = time.perf_counter() - start
    after = rss_mb()
    del model
    gc.collect()
    # speed: what `lbdl generate` runs (load_for_inference may re-lay fp32 weights out for speed)
    model, tok, _ = load_for_inference(model_dir, None, "cpu")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tok.vocab_size, (16,), generator=g).tolist()
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    generate(model, tok, [prompt], SamplingConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    out = generate(model, tok, [prompt], config)[0]
    return {"resident_mb": after - before, "load_s": load_s, "decode_tokens_per_s": out.decode_tokens_per_s,
            "prefill_tokens_per_s": out.prefill_tokens_per_s, "new_tokens": out.new_tokens}


# --- building the variants -------------------------------------------------------------------------------


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def build_speed_models(root: Path, tokenizer: Path) -> dict[str, Path]:
    import torch

    from lbdl_cli.checkpoint import InitConfig, create_model, load_model, save_model
    from lbdl_cli.quantize import QuantizeConfig, quantize_dir

    dirs = {"fp32": root / "fp32"}
    create_model(dirs["fp32"], InitConfig(preset="gpt2-124m", seed=0))
    shutil.copyfile(tokenizer, dirs["fp32"] / "tokenizer.model")
    model, _ = load_model(dirs["fp32"])
    dirs["bf16"] = save_model(model.to(torch.bfloat16), root / "bf16", tokenizer=tokenizer)
    del model
    for v in SPEED_VARIANTS[2:]:
        t, _, emb = v.partition("/")
        dirs[v] = root / v.replace("/", "-")
        quantize_dir(dirs["fp32"], dirs[v], QuantizeConfig(type=t, **({"embeddings": "same"} if emb else {})))
    return dirs


def measure_speed(dirs: dict[str, Path], repeats: int, threads: int, new_tokens: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {v: [] for v in dirs}
    for rep in range(repeats):
        for v, d in dirs.items():  # interleaved: every variant once per repeat
            cmd = [sys.executable, __file__, "--worker", str(d), "--threads", str(threads),
                   "--new-tokens", str(new_tokens)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  repeat {rep + 1}/{repeats} {v}: {runs[v][-1]['decode_tokens_per_s']:.1f} tokens/s, "
                  f"{runs[v][-1]['resident_mb']:.0f} MB", file=sys.stderr)
    table = {}
    for v, rs in runs.items():
        table[v] = {k: statistics.median(r[k] for r in rs) for k in ("resident_mb", "load_s", "decode_tokens_per_s",
                                                                     "prefill_tokens_per_s")}
        table[v]["decode_all"] = [round(r["decode_tokens_per_s"], 2) for r in rs]
        table[v]["size_bytes"] = dir_size(dirs[v])
    return table


def measure_perplexity(model_dir: Path, eval_file: Path) -> dict:
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.quantize import Reference, SweepConfig, run_sweep
    from quant.recipe import summarize
    from tokenizer import Tokenizer

    result = run_sweep(model_dir, eval_file, SweepConfig(types=PPL_TYPES, recipes=("pure",), dtype="float32"))
    bf16, _ = load_model(model_dir, dtype="bfloat16")
    ids = Tokenizer.load(model_dir).encode(eval_file.read_text())
    fp32, _ = load_model(model_dir, dtype="float32")
    res = Reference(fp32, ids, bf16.config.block_size).score(bf16)  # bf16's perplexity and its KL from fp32
    state = bf16.state_dict()
    stats = summarize({k: tuple(v.shape) for k, v in state.items()}, {k: 2 for k in state}, {})
    base = result["baseline"]["perplexity"]
    result["bf16"] = {"name": "BF16", "bits_per_weight": stats["bits_per_weight"], "size_bytes": stats["weights_bytes"],
                      "perplexity": res["perplexity"], "std_error": res["std_error"], "delta": res["perplexity"] - base,
                      "delta_pct": 100 * (res["perplexity"] / base - 1), "kld": res["kld"], "same_top": res["same_top"]}
    return result


# --- reporting --------------------------------------------------------------------------------------------


def host(threads: int) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"{threads} thread(s) per measurement")


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[:3].__str__()
    except OSError:
        return "unknown"


def speed_table(table: dict) -> str:
    fp = table["fp32"]
    lines = ["| variant | size on disk (MiB) | resident after load (MiB) | vs fp32 | decode tokens/s (batch 1) "
             "| vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for v, r in table.items():
        name = {"fp32": "fp32", "bf16": "bf16"}.get(v, v.upper().replace("/EMB", " (embeddings Q4_K too)"))
        lines.append(f"| {name} | {r['size_bytes'] / 2**20:.1f} "
                     f"| {r['resident_mb']:.0f} | {r['resident_mb'] / fp['resident_mb']:.2f} "
                     f"| {r['decode_tokens_per_s']:.1f} "
                     f"| {r['decode_tokens_per_s'] / fp['decode_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def ppl_table(result: dict) -> str:
    lines = ["| variant | bits/weight | size (MiB) | perplexity | change | KL divergence | same top token |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [result["baseline"], result["bf16"], *result["rows"]]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.2f} | {r['size_bytes'] / 2**20:.2f} "
                     f"| {r['perplexity']:.3f} ± {r['std_error']:.3f} | {r['delta_pct']:+.2f}% | {r['kld']:.5f} "
                     f"| {100 * r['same_top']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per measurement (1: stable on a shared machine)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", help="trained model for perplexity (default: the bundled default model)")
    parser.add_argument("--eval-file", default=str(ROOT / "data" / "tinyshakespeare-val.txt"))
    parser.add_argument("--calib-chars", type=int, default=60_000)
    parser.add_argument("--sweep-chars", type=int, default=30_000,
                        help="the full sweep (--figure) scores the first paragraphs of --eval-file up to this size")
    parser.add_argument("--figure", help="also run the full sweep and write its plot here (PNG)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.new_tokens)))
        return

    import torch

    from lbdl_cli.checkpoint import default_model_dir
    from lbdl_cli.quantize import SweepConfig, markdown_table, plot_sweep, run_sweep

    torch.set_num_threads(args.threads)

    print(f"Machine: {capabilities()}")
    print(f"Host: {host(args.threads)}")
    print(f"Load average at start: {load_average()}")
    model_dir = Path(args.model) if args.model else default_model_dir()
    eval_file = Path(args.eval_file)
    held_out = set(eval_file.read_text().split("\n\n"))
    paragraphs = (ROOT / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    train_paragraphs = [p for p in paragraphs if p not in held_out]
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        tmp = Path(tmp)
        calib_file = tmp / "calib.txt"  # calibration text: training paragraphs only
        calib_file.write_text("\n\n".join(train_paragraphs)[:args.calib_chars])
        if not args.skip_speed:
            t = time.perf_counter()
            dirs = build_speed_models(tmp / "speed", model_dir / "tokenizer.model")
            print(f"\nBuilt the GPT-2-124M variants in {time.perf_counter() - t:.0f}s; measuring "
                  f"{args.repeats} interleaved repeats of {args.new_tokens} decoded tokens...", file=sys.stderr)
            table = measure_speed(dirs, args.repeats, args.threads, args.new_tokens)
            print("\n### Speed and memory: GPT-2-124M shape (random weights), median of "
                  f"{args.repeats} interleaved repeats\n")
            print(speed_table(table))
            print("\nper-repeat decode tokens/s: " + "; ".join(f"{v} {r['decode_all']}" for v, r in table.items()))
            fp = table["fp32"]
            for v in ("q4_0", "q4_1", "q4_k", "q4_k/emb"):
                s = table[v]["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
                m = table[v]["resident_mb"] / fp["resident_mb"]
                print(f"target {v}: decode {s:.2f}x fp32 ({'met' if s >= 2 else 'MISSED'}: >= 2x), memory "
                      f"{m:.2f} of fp32 ({'met' if m <= 0.25 else 'MISSED'}: <= 0.25)")
            shutil.rmtree(tmp / "speed")
        if not args.skip_perplexity:
            result = measure_perplexity(model_dir, eval_file)
            print(f"\n### Perplexity: {model_dir} on {eval_file.name} "
                  f"({result['tokens']} scored tokens, ctx {result['ctx']})\n")
            print(ppl_table(result))
            q8 = next(r for r in result["rows"] if r["type"] == "q8_0")
            print(f"\ntarget q8_0: perplexity {q8['delta_pct']:+.3f}% vs fp32 "
                  f"({'met' if abs(q8['delta_pct']) <= 0.5 else 'MISSED'}: within 0.5%)")
        if args.figure:
            t = time.perf_counter()
            sweep_file = tmp / "sweep_eval.txt"
            text = eval_file.read_text()
            cut = text.rfind("\n\n", 0, args.sweep_chars) if len(text) > args.sweep_chars else len(text)
            sweep_file.write_text(text[:cut])
            full = run_sweep(model_dir, sweep_file, SweepConfig(calibrate=str(calib_file), dtype="float32"))
            print(f"\n### Sweep: every type and recipe, round to nearest and with an importance matrix, on the "
                  f"first {sweep_file.stat().st_size} bytes of {eval_file.name} ({full['tokens']} scored tokens, "
                  f"{time.perf_counter() - t:.0f}s)\n")
            print(markdown_table(full))
            plot_sweep(full, args.figure)
            print(f"\nwrote {args.figure}")
    print(f"\nLoad average at end: {load_average()} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
