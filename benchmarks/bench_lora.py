"""LoRA and QLoRA training steps: lbdl's adapters against PEFT on transformers, on the same weights.

    python benchmarks/bench_lora.py [--presets small,gpt2-124m] [--dtypes float32,bfloat16] [--steps 3]
                                    [--repeats 2] [--malloc-mmap-threshold BYTES] [--json FILE]

A model of each preset (random init, seed 0, no download) is saved once with `save_model` and exported with
`export_hf`, so both tools start from the same weights. Each measurement is a fresh process (peak resident
memory is per process), and the three settings alternate within each repeat (the order reversed every other
repeat) so that drift and other people's load hit them alike:

- lbdl LoRA: `load_model`, `apply_lora(LoRAConfig(rank=8, alpha=16))` (q/k/v/o_proj, the default), AdamW over
  the adapters, `model(x, targets=y)`.
- PEFT LoRA: `AutoModelForCausalLM.from_pretrained(hf_dir)`, `get_peft_model(LoraConfig(r=8, lora_alpha=16,
  target_modules=the same layers, lora_dropout=0))`, AdamW, `model(input_ids=x, labels=x).loss`. GPT-2's q, k
  and v are one fused matrix (c_attn) in transformers: PEFT adapts it as one layer (rank 8 on 3C outputs) where
  lbdl adapts q, k and v separately (rank 8 each), so lbdl trains more parameters (the table counts both).
- lbdl QLoRA: as lbdl LoRA, the base quantized first with `quantize_base(model, "nf4_dq")` (every matrix of the
  blocks; embeddings and head stay float32), and gradient checkpointing of every block and of the loss
  (`set_checkpointing(1)`), as `lbdl finetune --method qlora` does by default (the QLoRA recipe; PEFT's
  `prepare_model_for_kbit_training` does the same). PEFT's QLoRA needs bitsandbytes on CUDA: not compared.
- lbdl LoRA + checkpointing: lbdl LoRA with the same checkpointing, to tell QLoRA's saving by quantization from
  its saving by checkpointing.

A step is forward, backward, gradient clipping at 1.0, AdamW (lr 1e-4) and zero_grad on a batch of
--batch x --context random tokens (the same batches for every setting); bfloat16 is
`torch.autocast("cpu", torch.bfloat16)` around the forward for both tools (float32 weights). Reported per
setting: the median seconds per step over --steps steps after --warmup (excluded) and over the repeats,
"peak RSS" (getrusage ru_maxrss of the process: loading and set-up included), "step peak" (the kernel's VmHWM
reset after set-up: the largest resident size during the steps), the RSS after imports, and the trainable
parameters. glibc's malloc keeps freed memory of a process resident (its mmap threshold grows with the blocks
freed), so RSS overstates what is live; `--malloc-mmap-threshold 131072` runs every child with that threshold
fixed (MALLOC_MMAP_THRESHOLD_), which returns each large block on free: RSS then tracks live memory, at the cost of
page faults (slower steps). Needs peft and transformers (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("lbdl-lora", "peft-lora", "lbdl-qlora", "lbdl-lora-gc")
LABELS = {"lbdl-lora": "lbdl LoRA", "peft-lora": "PEFT LoRA", "lbdl-qlora": "lbdl QLoRA (nf4_dq, checkpointing)",
          "lbdl-lora-gc": "lbdl LoRA + checkpointing"}


def status_kib(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in KiB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process: Linux's clear_refs 5."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- one measurement, in a fresh process -------------------------------------------------------------------------


def child(args) -> dict:
    import torch

    if args.setting == "peft-lora":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    else:
        from lbdl_cli.checkpoint import load_model
        from lbdl_cli.lora import LoRAConfig, apply_lora
        from lbdl_cli.train.finetune import quantize_base
    rss_imports = status_kib("VmRSS")

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.setting == "peft-lora":
        hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        family = hf.config.model_type
        targets = ["c_attn", "attn.c_proj"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        model = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                              lora_dropout=0.0))
        vocab = hf.config.vocab_size

        def loss_of(x, y):
            return model(input_ids=x, labels=x).loss
    else:
        model, _ = load_model(args.model_dir, dtype=torch.float32)
        if args.setting == "lbdl-qlora":
            quantize_base(model, "nf4_dq")
        apply_lora(model, LoRAConfig(rank=args.rank, alpha=args.alpha))
        if args.setting in ("lbdl-qlora", "lbdl-lora-gc"):
            model.set_checkpointing(1)
        vocab = model.config.vocab_size
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]

        def loss_of(x, y):
            return model(x, targets=y)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16"
           else torch.autocast("cpu", enabled=False))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.context + 1), generator=g)
               for _ in range(args.warmup + args.steps)]
    setup_s = time.perf_counter() - t0
    rss_setup = status_kib("VmRSS")
    peak_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = reset_peak()

    times, losses = [], []
    for b in batches:
        x, y = b[:, :-1], b[:, 1:]
        t = time.perf_counter()
        with amp:
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return dict(setting=args.setting, dtype=args.dtype, targets=targets, trainable_params=trainable,
                step_s=times[args.warmup:], first_step_s=times[0], setup_s=setup_s, losses=losses,
                rss_imports_mib=rss_imports / 1024, rss_setup_mib=rss_setup / 1024,
                peak_setup_mib=peak_setup / 1024,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                step_peak_mib=status_kib("VmHWM") / 1024 if hwm_reset else None,
                threads=torch.get_num_threads())


def measure(setting: str, model_dir: Path, hf_dir: Path, dtype: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", setting, "--model-dir", str(model_dir), "--hf-dir", str(hf_dir),
           "--dtype", dtype, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--context", str(args.context), "--rank", str(args.rank), "--alpha", str(args.alpha)]
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.timeout,
                             env=env).stdout
    except subprocess.TimeoutExpired:  # recorded as such: emulated bf16 can take minutes a step
        return dict(setting=setting, dtype=dtype, timed_out=args.timeout)
    return json.loads(out.strip().splitlines()[-1])


# --- the run -----------------------------------------------------------------------------------------------------


def prepare(preset: str, root: Path) -> tuple[Path, Path, dict]:
    """The preset's model (seed 0) saved by lbdl and exported for transformers, once."""
    import torch

    from lbdl_cli.checkpoint import load_preset, save_model
    from lbdl_cli.checkpoint.hf import export_hf
    from lbdl_cli.model import GPT

    cfg = load_preset(preset)[0].replace(dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    model_dir, hf_dir = root / f"{preset}-lbdl", root / f"{preset}-hf"
    save_model(model, model_dir)
    del model
    export_hf(model_dir, hf_dir)
    shape = dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=cfg.vocab_size,
                 params=total)
    return model_dir, hf_dir, shape


def summarize(preset: str, shape: dict, dtype: str, runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        rs = [r for r in runs.get(setting, ()) if "timed_out" not in r]
        if not rs:
            if runs.get(setting):
                rows.append(dict(preset=preset, dtype=dtype, setting=setting, repeats=0, s_per_step=None,
                                 peak_rss_mib=None, step_peak_mib=None, rss_imports_mib=None, trainable_params=None,
                                 total_params=shape["params"], timed_out=runs[setting][0]["timed_out"]))
            continue
        peaks = [r["step_peak_mib"] for r in rs if r["step_peak_mib"] is not None]
        rows.append(dict(
            preset=preset, dtype=dtype, setting=setting, repeats=len(rs),
            s_per_step=statistics.median([t for r in rs for t in r["step_s"]]),
            s_per_step_runs=[statistics.median(r["step_s"]) for r in rs],
            peak_rss_mib=statistics.median([r["peak_rss_mib"] for r in rs]),
            step_peak_mib=statistics.median(peaks) if peaks else None,
            rss_imports_mib=statistics.median([r["rss_imports_mib"] for r in rs]),
            trainable_params=rs[0]["trainable_params"], total_params=shape["params"], targets=rs[0]["targets"],
            first_loss=rs[0]["losses"][0], last_loss=rs[0]["losses"][-1], runs=rs))
    return rows


def ratios(rows: list[dict]) -> dict:
    by = {r["setting"]: r for r in rows}
    lora, peft, qlora, lora_gc = (by.get(s) if by.get(s) and by[s]["s_per_step"] else None for s in SETTINGS)
    out = {}
    if lora and peft:
        out["speed_vs_peft"] = peft["s_per_step"] / lora["s_per_step"]
        out["peak_vs_peft"] = lora["peak_rss_mib"] / peft["peak_rss_mib"]
        if lora["step_peak_mib"] and peft["step_peak_mib"]:
            out["step_peak_vs_peft"] = lora["step_peak_mib"] / peft["step_peak_mib"]
    if lora and qlora:
        out["qlora_peak_vs_lora"] = qlora["peak_rss_mib"] / lora["peak_rss_mib"]
        if lora["step_peak_mib"] and qlora["step_peak_mib"]:
            out["qlora_step_peak_vs_lora"] = qlora["step_peak_mib"] / lora["step_peak_mib"]
        out["qlora_time_vs_lora"] = qlora["s_per_step"] / lora["s_per_step"]
    if lora_gc and qlora:  # the part of QLoRA's saving that quantization makes
        out["qlora_peak_vs_lora_gc"] = qlora["peak_rss_mib"] / lora_gc["peak_rss_mib"]
    return out


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,gpt2-124m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="steps excluded before them")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per setting, alternating")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one measurement (process); "
                        "one over it is reported as such")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, help="run the children with glibc's "
                        "MALLOC_MMAP_THRESHOLD_ fixed at this many bytes (0: the default, dynamic)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", choices=SETTINGS, dest="setting", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(child(args)), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import capabilities  # benchmarks/machine.py

    settings = [s for s in SETTINGS if s in args.settings.split(",")]
    started, load_before = time.perf_counter(), load_average()
    print(f"machine: {capabilities()}", flush=True)
    print(f"load average (1, 5, 15 min) before: {load_before}", flush=True)
    rows, ratio_rows, shapes = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            model_dir, hf_dir, shape = prepare(preset, Path(tmp))
            shapes[preset] = shape
            for dtype in args.dtypes.split(","):
                runs: dict[str, list[dict]] = {s: [] for s in settings}
                for r in range(args.repeats):
                    for setting in settings if r % 2 == 0 else settings[::-1]:
                        result = measure(setting, model_dir, hf_dir, dtype, args)
                        runs[setting].append(result)
                        if "timed_out" in result:
                            print(f"{preset} {dtype} {setting} #{r}: over {args.timeout} s, stopped", flush=True)
                            continue
                        print(f"{preset} {dtype} {setting} #{r}: {statistics.median(result['step_s']):.3f} s/step, "
                              f"peak {result['peak_rss_mib']:.0f} MiB, step peak "
                              f"{fmt(result['step_peak_mib'], '.0f')} MiB, load {load_average()}", flush=True)
                cell = summarize(preset, shape, dtype, runs)
                rows += cell
                ratio_rows.append(dict(preset=preset, dtype=dtype, **ratios(cell)))
    load_after = load_average()
    elapsed = time.perf_counter() - started

    print()
    print(f"batch {args.batch} x {args.context} tokens, rank {args.rank}, alpha {args.alpha:g}, AdamW over the "
          f"adapters; median s/step of {args.steps} steps after {args.warmup} excluded, x {args.repeats} fresh "
          f"processes per setting, alternating")
    print(f"machine: {capabilities()}")
    print(f"load average before {load_before}, after {load_after}; {elapsed:.0f} s in all")
    threshold = args.malloc_mmap_threshold
    print(f"malloc: {f'MALLOC_MMAP_THRESHOLD_={threshold}' if threshold else 'glibc default (dynamic threshold)'}")
    for preset, s in shapes.items():
        print(f"`{preset}`: {s['n_layer']} layers, n_embd {s['n_embd']}, vocab {s['vocab_size']}, "
              f"{s['params'] / 1e6:.1f}M parameters")
    print()
    print("| preset | dtype | setting | s/step | peak RSS MiB | step peak MiB | RSS after imports MiB | "
          "trainable params (share) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("timed_out"):
            print(f"| {r['preset']} | {r['dtype']} | {LABELS[r['setting']]} | over {r['timed_out']} s a run | "
                  f"- | - | - | - |")
            continue
        print(f"| {r['preset']} | {r['dtype']} | {LABELS[r['setting']]} | {r['s_per_step']:.3f} | "
              f"{r['peak_rss_mib']:.0f} | {fmt(r['step_peak_mib'], '.0f')} | {r['rss_imports_mib']:.0f} | "
              f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%) |")
    print()
    print("| preset | dtype | PEFT s/step / lbdl s/step (>= 1.2) | lbdl / PEFT peak RSS (<= 1) | lbdl / PEFT step peak "
          "| QLoRA / LoRA peak RSS (<= 0.5) | QLoRA / LoRA step peak | QLoRA / LoRA s/step (<= 2) "
          "| QLoRA / LoRA+checkpointing peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for q in ratio_rows:
        print(f"| {q['preset']} | {q['dtype']} | {fmt(q.get('speed_vs_peft'), '.2f')} | "
              f"{fmt(q.get('peak_vs_peft'), '.2f')} | {fmt(q.get('step_peak_vs_peft'), '.2f')} | "
              f"{fmt(q.get('qlora_peak_vs_lora'), '.2f')} | {fmt(q.get('qlora_step_peak_vs_lora'), '.2f')} | "
              f"{fmt(q.get('qlora_time_vs_lora'), '.2f')} | {fmt(q.get('qlora_peak_vs_lora_gc'), '.2f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=capabilities(), load_before=load_before,
                                                    load_after=load_after, seconds=elapsed, shapes=shapes,
                                                    rows=rows, ratios=ratio_rows), indent=2))


if __name__ == "__main__":
    main()
