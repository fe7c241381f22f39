"""Merging: `lbdl merge` against mergekit's `mergekit-yaml`, the same TIES merge of the same weights.

    python benchmarks/bench_merge.py [--preset gpt2-124m] [--models 3] [--density 0.5] [--repeats 3]
                                     [--json FILE]

A base of the preset (random init, seed 0, no download) and --models fine-tunes of it (the base plus seeded
Gaussian noise, std --noise) are saved once by lbdl (`save_model`) and exported with `export_hf`, so both tools
merge the same numbers, lbdl from its directories and mergekit from the exported ones. The merge is TIES at
--density, every weight 1 (normalize on: both tools' default):

- lbdl: `python -m lbdl_cli merge --method ties --base B --model M1 ... --density 0.5 --out DIR`
- mergekit: `mergekit-yaml config.yml DIR --no-copy-tokenizer --no-cuda --quiet` (config: merge_method ties,
  base_model, dtype float32, parameters.density, one model entry per fine-tune with weight 1; the default shard
  size, 5B parameters, writes one file).

Each measurement is a fresh process, the two tools alternating (the order reversed every other repeat) so that
drift and other people's load hit them alike. Reported per tool: the median wall time of the command (Python's
start-up and imports included: that is what a user waits for) and the median peak resident memory, the child's
ru_maxrss from os.wait4 (the largest resident size of the process, loading included); the ratios lbdl / mergekit
with the targets (time <= 1.0x, peak memory <= 1.0x). Once per run, after the measurements, mergekit's output is
imported back (`import_hf`) and compared with lbdl's (max |difference|, entries differing by more than 1e-5),
separately over GPT-2's q/k/v, which transformers fuses into one c_attn matrix: TIES's top-k is taken per tensor,
so mergekit trims the fused matrix where lbdl trims q, k and v each (tests/test_merge_mergekit.py). The other
tensors can differ only where entries of a task vector tie in magnitude at its k-th largest: which of them is
kept is each tool's sort order (lbdl's sort is stable, over its [out, in] layout; mergekit's is not).
Needs mergekit and transformers (the `test` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

TOOLS = ("lbdl", "mergekit")
LABELS = {"lbdl": "lbdl merge", "mergekit": "mergekit-yaml"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def mergekit_yaml() -> str:
    """mergekit's command, beside this Python's (a virtual environment's bin/), else on PATH."""
    here = Path(sys.executable).parent / "mergekit-yaml"
    found = str(here) if here.is_file() else shutil.which("mergekit-yaml")
    if not found:
        sys.exit("mergekit-yaml not found: install mergekit (the `test` extra) into this environment")
    return found


# --- the inputs, once --------------------------------------------------------------------------------------------


def prepare(args, root: Path) -> dict:
    """The base and the fine-tunes saved by lbdl and exported for transformers; their paths and the shape."""
    import torch

    from lbdl_cli.checkpoint import load_preset, save_model
    from lbdl_cli.checkpoint.hf import export_hf
    from lbdl_cli.model import GPT

    cfg = load_preset(args.preset)[0].replace(dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["base", *(f"ft{i}" for i in range(1, args.models + 1))]
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k])
                if i:
                    p.add_(torch.randn(p.shape, generator=g) * args.noise)
        save_model(model, root / name)
        export_hf(root / name, root / f"{name}-hf")
    params = sum(p.numel() for p in model.parameters())
    del model, base
    lines = ["merge_method: ties", f"base_model: {root / 'base-hf'}", "dtype: float32",
             f"parameters:\n  density: {args.density}", "models:"]
    lines += [f"  - model: {root / f'{n}-hf'}\n    parameters:\n      weight: 1.0" for n in names[1:]]
    (root / "config.yml").write_text("\n".join(lines) + "\n")
    return dict(root=root, names=names, params=params, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                vocab_size=cfg.vocab_size)


def command(tool: str, inputs: dict, out: Path, args) -> list[str]:
    root, names = inputs["root"], inputs["names"]
    if tool == "lbdl":
        models = [a for n in names[1:] for a in ("--model", str(root / n))]
        return [sys.executable, "-m", "lbdl_cli", "merge", "--method", "ties", "--base", str(root / "base"), *models,
                "--density", str(args.density), "--out", str(out)]
    return [mergekit_yaml(), str(root / "config.yml"), str(out), "--no-copy-tokenizer", "--no-cuda", "--quiet"]


# --- one measurement, a fresh process ----------------------------------------------------------------------------


def measure(tool: str, inputs: dict, out: Path, args) -> dict:
    """Wall time and the child's peak RSS (ru_maxrss from wait4: this process alone, not earlier children)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(tool, inputs, out, args)
    log = out.with_suffix(".log")
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the child
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
    return dict(tool=tool, wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, user_s=usage.ru_utime,
                sys_s=usage.ru_stime)


def startup(tool: str) -> float:
    """Seconds for the command's --help alone: its interpreter start and imports."""
    cmd = ([sys.executable, "-m", "lbdl_cli", "merge", "--help"] if tool == "lbdl" else [mergekit_yaml(), "--help"])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


# --- the two outputs agree ---------------------------------------------------------------------------------------


def agreement(ours_dir: Path, theirs_hf: Path, scratch: Path) -> dict:
    """mergekit's output imported into lbdl, against lbdl's: per kind of tensor (q/k/v, which GPT-2 fuses into one
    c_attn matrix that mergekit trims as one; every other), the max |difference|, where, and how many entries
    differ by more than 1e-5."""
    from safetensors import safe_open

    from lbdl_cli.checkpoint.hf import import_hf

    import_hf(theirs_hf, scratch)
    out = {kind: dict(max_diff=0.0, tensor="none", differing=0, entries=0) for kind in ("other", "qkv")}
    with safe_open(str(ours_dir / "model.safetensors"), "pt") as a, \
            safe_open(str(scratch / "model.safetensors"), "pt") as b:
        if set(a.keys()) != set(b.keys()):
            sys.exit(f"the outputs have different tensors: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}")
        for name in a.keys():
            diff = (a.get_tensor(name).float() - b.get_tensor(name).float()).abs()
            row = out["qkv" if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") else "other"]
            row["differing"] += int((diff > 1e-5).sum())
            row["entries"] += diff.numel()
            if float(diff.max()) > row["max_diff"]:
                row["max_diff"], row["tensor"] = float(diff.max()), name
    return out


def agreement_line(kind: str, row: dict) -> str:
    what = "q/k/v" if kind == "qkv" else "every tensor but q/k/v"
    return (f"{what}: max |difference| {row['max_diff']:.3g} ({row['tensor']}), {row['differing']:,} of "
            f"{row['entries']:,} entries differ by more than 1e-5")


# --- the run -----------------------------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    return {tool: dict(repeats=len(rs), wall_s=statistics.median(r["wall_s"] for r in rs),
                       peak_rss_mib=statistics.median(r["peak_rss_mib"] for r in rs),
                       cpu_s=statistics.median(r["user_s"] + r["sys_s"] for r in rs),
                       wall_s_runs=[r["wall_s"] for r in rs], peak_rss_mib_runs=[r["peak_rss_mib"] for r in rs])
            for tool, rs in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--models", type=int, default=3, help="fine-tunes merged (besides the base)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.01, help="std of each fine-tune's noise over the base")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per tool, alternating")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import capabilities  # benchmarks/machine.py

    if importlib.util.find_spec("mergekit") is None:  # refuse early, before minutes of set-up
        sys.exit("mergekit is not installed: install it (the `test` extra) into this environment")
    started, load_before = time.perf_counter(), load_average()
    versions = f"mergekit {version('mergekit')}, transformers {version('transformers')}"
    print(f"machine: {capabilities()}; {versions}", flush=True)
    print(f"load average (1, 5, 15 min) before: {load_before}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        inputs = prepare(args, tmp)
        print(f"prepared {args.models + 1} models of {inputs['params'] / 1e6:.1f}M parameters "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        starts = {tool: startup(tool) for tool in TOOLS}
        runs: dict[str, list[dict]] = {t: [] for t in TOOLS}
        for r in range(args.repeats):
            for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
                result = measure(tool, inputs, tmp / f"out-{tool}", args)
                runs[tool].append(result)
                print(f"{LABELS[tool]} #{r}: {result['wall_s']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB, "
                      f"load {load_average()}", flush=True)
        load_after = load_average()
        agree = agreement(tmp / "out-lbdl", tmp / "out-mergekit", tmp / "mergekit-imported")
    elapsed = time.perf_counter() - started
    stats = summarize(runs)
    lbdl, mk = stats["lbdl"], stats["mergekit"]
    time_ratio, peak_ratio = lbdl["wall_s"] / mk["wall_s"], lbdl["peak_rss_mib"] / mk["peak_rss_mib"]

    print()
    print(f"`{args.preset}` ({inputs['n_layer']} layers, n_embd {inputs['n_embd']}, vocab {inputs['vocab_size']}, "
          f"{inputs['params'] / 1e6:.1f}M parameters, float32): TIES of {args.models} fine-tunes over the base, "
          f"density {args.density:g}, weights 1; median of {args.repeats} fresh processes per tool, alternating")
    print(f"machine: {capabilities()}; {versions}")
    print(f"load average before {load_before}, after the measurements {load_after}; {elapsed:.0f} s in all")
    print()
    print("| tool | wall s (median) | wall s (runs) | CPU s | peak RSS MiB (median) | peak RSS MiB (runs) | "
          "--help alone s |")
    print("|---|---:|---|---:|---:|---|---:|")
    for tool in TOOLS:
        s = stats[tool]
        print(f"| {LABELS[tool]} | {s['wall_s']:.1f} | {', '.join(f'{x:.1f}' for x in s['wall_s_runs'])} | "
              f"{s['cpu_s']:.1f} | {s['peak_rss_mib']:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in s['peak_rss_mib_runs'])} | {starts[tool]:.1f} |")
    print()
    print("| lbdl / mergekit | measured | target | met |")
    print("|---|---:|---:|---|")
    print(f"| wall time | {time_ratio:.2f}x | <= 1.0x | {'yes' if time_ratio <= 1 else 'no'} |")
    print(f"| peak RSS | {peak_ratio:.2f}x | <= 1.0x | {'yes' if peak_ratio <= 1 else 'no'} |")
    print()
    print("agreement (mergekit's output imported back into lbdl):")
    print(f"- {agreement_line('other', agree['other'])} (expected: none, but for entries tied in magnitude at a "
          f"task vector's k-th largest, which each tool's sort orders its own way)")
    print(f"- {agreement_line('qkv', agree['qkv'])} (expected: GPT-2's c_attn is trimmed as one matrix by "
          f"mergekit, as q, k and v by lbdl)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=capabilities(), versions=versions, load_before=load_before, load_after=load_after,
            seconds=elapsed, preset=args.preset, params=inputs["params"], models=args.models, density=args.density,
            noise=args.noise, repeats=args.repeats, startup_s=starts, tools=stats, runs=runs, agreement=agree,
            ratios=dict(time=time_ratio, peak_rss=peak_ratio)), indent=2))


if __name__ == "__main__":
    main()
