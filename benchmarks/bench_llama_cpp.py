"""lbdl against llama.cpp on the same weights: lbdl's torch engine, `--engine llama.cpp` (llama.cpp through
llama-cpp-python, driven by lbdl's generate loop) and llama.cpp's own `llama-bench` and `llama-perplexity`.

    python benchmarks/bench_llama_cpp.py WORK [--shapes small,gpt2-124m] [--families gpt2,llama]
                                              [--types f32,bf16,q8_0,q4_0] [--threads 1,2] [--repeats 3]
                                              [--json out.json]

Needs the `llama` extra (`pip install 'lbdl[llama]'`). The first run builds `llama-bench` and `llama-perplexity`
from the sdist of the installed llama-cpp-python (the same llama.cpp, so the same kernels): `pip download` and
cmake into WORK/llama.cpp (about 6-10 minutes on 2 cores); later runs reuse them.

Models: random weights (seed 0) in two shapes, lbdl's presets `small` (8 layers, 512 wide) and `gpt2-124m` (12
layers, 768 wide), both with the bundled 4096-token tokenizer (so the 124M shape has 88M parameters), each in both
families: GPT-2 (the preset) and Llama (the same widths with RMSNorm, rotary positions, SwiGLU, no biases and 4
query heads per key/value head). Each is saved as float32, bfloat16, and quantized to q8_0 and q4_0 (lbdl
quantize, default recipe: the token embedding q8_0, the matrices of the type). One GGUF file per model (the
engine's cached export) is what both llama.cpp columns run.

Per model and thread count (torch.set_num_threads; llama.cpp's -t): batch 1, a prompt of 128 random ids, then 64
greedy tokens (<eos> ignored). Prompt tok/s = 128 / the prefill time (to the first new token); decode tok/s =
the tokens after the first / their time. lbdl runs `generate()` (what `lbdl generate` calls) with each engine;
llama-bench runs pp128 and tg64 at depth 128 (`-d 128`: its decode, like ours, after 128 tokens of context). The
torch engine runs a bfloat16 model as `lbdl generate` would: in bfloat16 only where this CPU computes it faster
than float32 (kernels.compute_dtype), else in float32. Perplexity tok/s: 16 windows of 512 tokens of the bundled
validation text, the llama.cpp convention, at the largest thread count. Every cell is the median of --repeats
runs after one warm-up; the runs of the three take turns within each repeat, and each model and thread count
runs in a process of its own. "matvec ceiling" (float models): the
tokens/s of a decode step that only multiplies one vector by each of the torch model's matrices with the kernels
lbdl picks (bench_generate.py), what the torch engine cannot pass.

Also the perplexity parity of the bundled model: `llama-perplexity` on its export against `lbdl eval
perplexity` with both engines, the same text and context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import capabilities  # benchmarks/machine.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "data" / "tinyshakespeare-val.txt"
SHAPES = {"small": "small", "gpt2-124m": "gpt2-124m"}  # lbdl presets
LLAMA = dict(mlp="swiglu", norm="rmsnorm", positions="rope", bias=False)
TYPES = ("f32", "bf16", "q8_0", "q4_0")
PROMPT, NEW = 128, 64
PPL_CTX, PPL_WINDOWS = 512, 16


# --- llama.cpp's tools --------------------------------------------------------------------------------------------


def build_tools(work: Path) -> dict[str, Path]:
    """llama-bench and llama-perplexity built from the installed llama-cpp-python's sdist (its vendored
    llama.cpp), once: {name: path}."""
    import llama_cpp

    root = work / "llama.cpp"
    bins = {name: root / "build" / "bin" / name for name in ("llama-bench", "llama-perplexity")}
    if all(p.is_file() for p in bins.values()):
        return bins
    root.mkdir(parents=True, exist_ok=True)
    version = llama_cpp.__version__
    src = root / f"llama_cpp_python-{version}"
    if not src.is_dir():
        print(f"downloading the llama-cpp-python {version} sdist ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(root)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["tar", "xzf", f"llama_cpp_python-{version}.tar.gz"], cwd=root, check=True)
    print("building llama-bench and llama-perplexity (cmake; minutes) ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(root / "build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", *bins, "-j", str(os.cpu_count() or 1)],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return bins


def llama_bench(tool: Path, gguf: Path, threads: int, repeats: int) -> dict:
    """llama-bench's tokens/s (its own mean over `repeats`): pp128 from an empty context, and tg64 at depth 128
    (after a 128-token context, as lbdl decodes after its prompt)."""
    def run(*args):
        out = subprocess.run([str(tool), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json",
                              *args], check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]["avg_ts"]

    return {"prompt": run("-p", str(PROMPT), "-n", "0"), "decode": run("-p", "0", "-n", str(NEW), "-d", str(PROMPT))}


def llama_perplexity(tool: Path, gguf: Path, text: Path, ctx: int, threads: int, chunks: int | None = None) -> dict:
    """llama-perplexity's final estimate and its evaluation tokens/s (chunks x ctx / wall time of the run,
    tokenization and loading included, so a lower bound)."""
    args = [str(tool), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    if chunks:
        args += ["--chunks", str(chunks)]
    log_path = Path(gguf).with_suffix(".perplexity.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:  # into a file: through pipes the tail of its log (the estimate) got lost
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    text_out = log_path.read_text()
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", text_out).group(1))
    n = int(re.search(r"calculating perplexity over (\d+) chunks", text_out).group(1))
    return {"perplexity": ppl, "tokens_per_s": n * ctx / seconds}


# --- models -------------------------------------------------------------------------------------------------------


def make_models(work: Path, shape: str, family: str, types) -> dict[str, Path]:
    """{type: model directory} of one shape and family (made once, kept in WORK)."""
    from lbdl_cli.checkpoint import default_model_dir, load_model, load_preset, save_model
    from lbdl_cli.model import GPT, ModelConfig
    from lbdl_cli.quantize import QuantizeConfig, quantize_dir

    base = work / "models" / f"{shape}-{family}"
    dirs = {t: base.with_name(f"{base.name}-{t}") for t in types}
    tokenizer = default_model_dir() / "tokenizer.model"
    f32 = base.with_name(f"{base.name}-f32")
    if not f32.is_dir():
        preset = load_preset(SHAPES[shape])[0]
        cfg = {k: getattr(preset, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "mlp", "norm",
                                               "positions", "bias", "tie_embeddings", "norm_eps")}
        cfg["vocab_size"] = 4096
        if family == "llama":
            cfg.update(LLAMA, n_kv_head=cfg["n_head"] // 4)
        torch.manual_seed(0)
        save_model(GPT(ModelConfig(**cfg)).eval(), f32, tokenizer=tokenizer)
    for t, d in dirs.items():
        if d.is_dir() or t == "f32":
            continue
        if t == "bf16":
            model, _ = load_model(f32)
            save_model(model.to(torch.bfloat16), d, tokenizer=tokenizer)
        else:
            quantize_dir(f32, d, QuantizeConfig(type=t))
    return dirs


def params(model_dir: Path) -> int:
    from lbdl_cli.checkpoint import model_info

    return int(model_info(model_dir)["params"])


# --- lbdl's engines -----------------------------------------------------------------------------------------------


def lbdl_speed(model, prompt: list[int]) -> dict:
    from lbdl_cli.sample import SamplingConfig, generate

    [g] = generate(model, None, [prompt], SamplingConfig(temperature=0, max_new_tokens=NEW, ignore_eos=True))
    return {"prompt": g.prefill_tokens_per_s, "decode": g.decode_tokens_per_s}


def lbdl_perplexity_speed(model, ids) -> float:
    from lbdl_cli.evaluate import perplexity

    return perplexity(model, ids[:PPL_CTX * PPL_WINDOWS], PPL_CTX)["tokens_per_s"]


def load(model_dir: Path, engine: str, threads: int):
    from lbdl_cli.sample import load_for_inference

    torch.set_num_threads(threads)
    model, tok, _ = load_for_inference(model_dir, None, "cpu", engine=engine)
    return model


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run_one(model_dir: Path, gguf: Path, threads: int, repeats: int, tools: dict, prompt: list[int],
            quantized: bool) -> dict:
    """Prompt and decode tok/s of the three, taking turns within each repeat; for a float model, the torch
    engine's matvec ceiling (bench_generate.py: a decode step of nothing but its matrix-vector products)."""
    from bench_generate import matvec_ceiling

    from lbdl_cli.sample.loading import describe

    models = {e: load(model_dir, e, threads) for e in ("torch", "llama.cpp")}
    for m in models.values():  # warm-up: first-call allocations, the kernels' probe
        lbdl_speed(m, prompt[:16])
    runs = {"torch": [], "llama.cpp": [], "llama-bench": []}
    for _ in range(repeats):
        for e, m in models.items():
            runs[e].append(lbdl_speed(m, prompt))
        runs["llama-bench"].append(llama_bench(tools["llama-bench"], gguf, threads, 1))
    out = {e: {k: median(r, k) for k in ("prompt", "decode")} for e, r in runs.items()}
    out["torch_dtype"] = describe(models["torch"])["dtype"]
    out["ceiling"] = None if quantized else matvec_ceiling(models["torch"])
    for m in models.values():
        if hasattr(m, "close"):
            m.close()
    return out


def measure_one(work: Path, model_dir: Path, type_: str, threads: int, repeats: int, with_perplexity: bool):
    """One model at one thread count (a child process of main): its numbers as one JSON line on stdout."""
    from lbdl_cli.checkpoint import default_model_dir
    from lbdl_cli.sample.engine import cached_gguf
    from tokenizer import Tokenizer

    torch.set_num_threads(threads)
    tools = build_tools(work)
    prompt = torch.randint(4, 4096, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    gguf = cached_gguf(model_dir)
    r = run_one(model_dir, gguf, threads, repeats, tools, prompt, type_.startswith("q"))
    if with_perplexity:
        ids = Tokenizer.load(default_model_dir()).encode(VAL.read_text())
        r["ppl_threads"] = threads
        r["perplexity_tok_s"] = perplexity_speeds(model_dir, gguf, threads, tools, ids, VAL)
    print(json.dumps(r))


def perplexity_speeds(model_dir: Path, gguf: Path, threads: int, tools: dict, ids, text: Path) -> dict:
    out = {}
    for e in ("torch", "llama.cpp"):
        m = load(model_dir, e, threads)
        out[e] = lbdl_perplexity_speed(m, ids)
        if hasattr(m, "close"):
            m.close()
    out["llama-perplexity"] = llama_perplexity(tools["llama-perplexity"], gguf, text, PPL_CTX, threads,
                                               chunks=PPL_WINDOWS)["tokens_per_s"]
    return out


def bundled_parity(tools: dict, threads: int) -> dict:
    """The bundled model's perplexity on the validation text, context 256: llama-perplexity on the engine's export
    against lbdl eval perplexity with each engine."""
    from lbdl_cli.checkpoint import default_model_dir
    from lbdl_cli.evaluate import PerplexityConfig, perplexity_of_file
    from lbdl_cli.sample.engine import cached_gguf

    torch.set_num_threads(threads)
    out = {}
    for dtype in ("auto", "float32"):
        gguf = cached_gguf(default_model_dir(), dtype)
        ref = llama_perplexity(tools["llama-perplexity"], gguf, VAL, 256, threads)["perplexity"]
        ours = {e: perplexity_of_file(None, VAL, PerplexityConfig(context=256, engine=e, compute_dtype=dtype))
                for e in ("torch", "llama.cpp")}
        out[dtype] = {"llama-perplexity": ref, **{e: r["perplexity"] for e, r in ours.items()},
                      "file_type": ours["llama.cpp"]["dtype"]}
    return out


# --- report -------------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    lines = ["| model | params | type | threads | prompt tok/s: torch / engine / llama-bench | decode tok/s: torch / "
             "engine / llama-bench | torch/llama-bench (prompt, decode) | engine/llama-bench (prompt, decode) | "
             "torch matvec ceiling, decode tok/s |",
             "|---|---:|---|---:|---|---|---|---|---:|"]
    for r in results:
        t, e, b = r["torch"], r["llama.cpp"], r["llama-bench"]
        lines.append(
            f"| {r['shape']} {r['family']} | {r['params'] / 1e6:.1f}M | {r['type']} | {r['threads']} | "
            f"{t['prompt']:,.0f} / {e['prompt']:,.0f} / {b['prompt']:,.0f} | "
            f"{t['decode']:,.0f} / {e['decode']:,.0f} / {b['decode']:,.0f} | "
            f"{t['prompt'] / b['prompt']:.2f}x, {t['decode'] / b['decode']:.2f}x | "
            f"{e['prompt'] / b['prompt']:.2f}x, {e['decode'] / b['decode']:.2f}x | "
            + (f"{r['ceiling']:,.0f} ({r['torch_dtype']}) |" if r.get("ceiling") else "- |"))
    return "\n".join(lines)


def ppl_table(results: list[dict]) -> str:
    lines = ["| model | type | threads | torch | engine | llama-perplexity | torch/llama-perplexity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r.get("perplexity_tok_s")
        if p:
            lines.append(f"| {r['shape']} {r['family']} | {r['type']} | {r['ppl_threads']} | {p['torch']:,.0f} | "
                         f"{p['llama.cpp']:,.0f} | {p['llama-perplexity']:,.0f} | "
                         f"{p['torch'] / p['llama-perplexity']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="folder for the models, the exports' tools and the results")
    ap.add_argument("--shapes", default="small,gpt2-124m")
    ap.add_argument("--families", default="gpt2,llama")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-perplexity", action="store_true", help="skip the perplexity speeds and parity")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--one", nargs=3, metavar=("DIR", "TYPE", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--with-perplexity", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import llama_cpp

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LBDL_CACHE_DIR", str(work / "cache"))  # the engine's exports, beside the models
    if args.one:
        return measure_one(work, Path(args.one[0]), args.one[1], int(args.one[2]), args.repeats,
                           args.with_perplexity)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"{capabilities()}; {os.cpu_count()} cores, load average {load_avg:.2f} at start; Python "
              f"{platform.python_version()}, llama-cpp-python {llama_cpp.__version__}")
    print(header, flush=True)
    print(llama_cpp.llama_print_system_info().decode(), flush=True)
    tools = build_tools(work)
    threads = [int(t) for t in args.threads.split(",")]
    from lbdl_cli.sample.engine import cached_gguf

    results = []
    for shape in args.shapes.split(","):
        for family in args.families.split(","):
            dirs = make_models(work, shape, family, args.types.split(","))
            for t, d in dirs.items():
                cached_gguf(d)  # exported once, here
                for n in threads:  # each in a process of its own, as a command runs: torch keeps per-process
                    # state a thread count change does not reset (after 1 thread, its 2-thread decode was slower)
                    ppl = not args.no_perplexity and n == max(threads)
                    out = subprocess.run([sys.executable, __file__, str(work), "--one", str(d), t, str(n),
                                          "--repeats", str(args.repeats)] + (["--with-perplexity"] if ppl else []),
                                         check=True, capture_output=True, text=True).stdout
                    r = {"shape": shape, "family": family, "type": t, "threads": n, "params": params(d),
                         **json.loads(out.splitlines()[-1])}
                    results.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
    print("\n" + header + "\n\n" + table(results))
    if not args.no_perplexity:
        print("\nperplexity evaluation tokens/s (16 windows of 512)\n\n" + ppl_table(results))
    parity = None if args.no_perplexity else bundled_parity(tools, max(threads))
    if parity:
        print("\nbundled model, validation text, context 256: " + json.dumps(parity))
    if args.json:
        args.json.write_text(json.dumps({"machine": header, "results": results, "parity": parity}, indent=1))


if __name__ == "__main__":
    main()
