"""Gradient (activation) checkpointing: the memory/compute trade of recomputing segments of k blocks.

    python benchmarks/bench_checkpointing.py [--preset small] [--batch 8] [--context 256] [--steps 3]
                                             [--every 0,1,2,4,8] [--repeats 3]

Each setting runs in a fresh process (peak resident memory is per process): a model of the preset, AdamW, `steps`
training steps of batch x context random tokens in float32; it reports the median seconds per step (the first
step, which allocates, left out) and the process's peak RSS, against no checkpointing measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from machine import capabilities


def one(preset: str, batch: int, context: int, steps: int, every: int) -> dict:
    import torch

    from lbdl_cli.checkpoint import load_preset
    from lbdl_cli.model import GPT

    torch.manual_seed(0)
    cfg, _ = load_preset(preset)
    model = GPT(cfg.replace(block_size=max(cfg.block_size, context))).train()
    model.set_checkpointing(every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, context))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(x, targets=x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"every": every, "s_per_step": statistics.median(times[1:]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--every", default="0,1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="Write the rows to this file.")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.preset, args.batch, args.context, args.steps, args.child)))
        return
    print(capabilities())
    print(f"preset {args.preset}, batch {args.batch} x {args.context} tokens, float32, {args.steps} steps per run, "
          f"median of {args.repeats} runs (runs alternate between settings)")
    settings = [int(e) for e in args.every.split(",")]
    results: dict[int, list] = {e: [] for e in settings}
    for _ in range(args.repeats):
        for every in settings:
            out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                                  "--context", str(args.context), "--steps", str(args.steps), "--child", str(every)],
                                 capture_output=True, text=True, check=True).stdout
            results[every].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for every in settings:
        runs = results[every]
        rows.append({"every": every, "s_per_step": statistics.median(r["s_per_step"] for r in runs),
                     "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs), "loss": runs[0]["loss"]})
    base = rows[0]
    print("\n| checkpointing | s/step | x time | peak RSS MiB | x memory | loss (same data) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "off" if r["every"] == 0 else f"segments of {r['every']}"
        print(f"| {name} | {r['s_per_step']:.3f} | {r['s_per_step'] / base['s_per_step']:.2f} | "
              f"{r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} | {r['loss']:.4f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
