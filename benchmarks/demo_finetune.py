"""Fine-tuning demonstrations of docs/FINETUNING.md: full, LoRA and QLoRA on the bundled model, measured.

    OMP_NUM_THREADS=1 python benchmarks/demo_finetune.py WORKDIR [--steps 100] [--batch-size 8] [--context 256]
        [--lr-lora 1e-3] [--lr-full 1e-4] [--extra-lr-lora X] [--extra-lr-full X] [--extra-targets T]
        [--only-extra] [--arith-steps 80] [--arith-full] [--skip-domain] [--skip-arith] [--json FILE]

Every measurement is a subprocess of the `lbdl` CLI (`python -m lbdl_cli ... --json`, its last line read); the
data files and runs go into WORKDIR (created; the repository is not written). Two demonstrations:

(a) Domain adaptation: the bundled Shakespeare model (models/default) on the source of Python's standard library
    of the interpreter running this script (`sysconfig.get_paths()["stdlib"]`, so the numbers belong to that
    Python version). The candidates are the top-level `*.py` files of 2-30 KB, sorted by name. Of every 10th
    from the 6th (index 5, 15, ...) those that fit in --heldout-kb together, in order, are HELD OUT,
    concatenated into `heldout.txt`; of every 4th from the first (index 0, 4, ...; never a held-out one) those
    that fit in --train-kb train, each cut at line breaks into `{"text": ...}` records of at most --chunk-chars
    characters (`stdlib-train.jsonl`; `lbdl finetune` draws 10% of the records for validation). `lbdl eval
    perplexity` of `heldout.txt` before (base) and after `lbdl finetune --method full|lora|qlora` with the same
    steps, batch, context, seed and schedule (lr per method: --lr-full, --lr-lora for LoRA and QLoRA, and
    optionally one other each). A QLoRA adapter is evaluated as `lbdl eval perplexity --adapter` applies it (on
    the float base whose hash it records), and also on its frozen base written as a model (`lbdl quantize MODEL
    --type nf4_dq --recipe pure --embeddings keep`: the blocks' matrices in nf4_dq as `--method qlora` has them,
    the embeddings and norms stored bf16; `--force-base`, the hash being the float base's).
(b) Arithmetic: `lbdl eval task models/default data/tasks/arithmetic-test.jsonl --extract number` before and after
    LoRA fine-tuning on data/tasks/arithmetic-train.jsonl ({prompt, completion}: loss on the answer only), and
    with --arith-full after full fine-tuning too.

Trainable parameters: a LoRA run's are the tensors of its adapter (best/adapter_model.safetensors); a full run
trains every parameter (the run's "params"). Wall times are rough: they include start-up, evaluations and
checkpoints, and depend on the machine's other load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lbdl_run import lbdl  # noqa: E402  (benchmarks/lbdl_run.py)
from machine import capabilities  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "default"
TASKS = ROOT / "data" / "tasks"


# --- (a) data ----------------------------------------------------------------------------------------------------


def chunks(text: str, limit: int) -> list[str]:
    """`text` cut at line breaks into pieces of at most `limit` characters (a longer line is a piece alone)."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > limit:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return out


def take(files: list[Path], limit: int) -> tuple[list[Path], int]:
    """The files, in order, that fit within `limit` bytes together (one that would overflow it is skipped)."""
    out, total = [], 0
    for p in files:
        if total + p.stat().st_size <= limit:
            out.append(p)
            total += p.stat().st_size
    return out, total


def stdlib_data(work: Path, train_kb: int, heldout_kb: int, chunk_chars: int) -> dict:
    """Write stdlib-train.jsonl and heldout.txt into `work`; what was taken."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(p for p in stdlib.glob("*.py") if 2000 <= p.stat().st_size <= 30000)
    held, held_bytes = take(candidates[5::10], heldout_kb * 1000)
    train, train_bytes = take(candidates[::4], train_kb * 1000)
    assert not set(held) & set(train)
    records = [c for p in train for c in chunks(p.read_text(encoding="utf-8"), chunk_chars)]
    with open(work / "stdlib-train.jsonl", "w", encoding="utf-8") as f:
        for c in records:
            f.write(json.dumps({"text": c}) + "\n")
    (work / "heldout.txt").write_text("".join(p.read_text(encoding="utf-8") for p in held), encoding="utf-8")
    return {"stdlib": str(stdlib), "candidates": len(candidates), "train_files": [p.name for p in train],
            "train_bytes": train_bytes, "train_records": len(records), "heldout_files": [p.name for p in held],
            "heldout_bytes": held_bytes}


# --- runs --------------------------------------------------------------------------------------------------------


def n_params(path: Path) -> int:
    from lbdl_cli.files import tensor_entries

    return sum(math.prod(e["shape"]) for e in tensor_entries(path).values())


def trainable(run: Path, result: dict) -> int:
    """Trainable parameters of a finished run: the adapters by lbdl's names (best/lora_state.safetensors: q, k
    and v separately; PEFT's file holds GPT-2's fused c_attn as one block-diagonal pair, more numbers than were
    trained), or every parameter of a full run."""
    if result["method"] == "full":
        return int(result["params"])
    return n_params(run / "best" / "lora_state.safetensors")


def finetune(work: Path, name: str, data: Path, method: str, lr: float, common: list, steps: int,
             extra: tuple = ()) -> dict:
    run = work / "runs" / name
    res, wall = lbdl(["finetune", MODEL, data, "--method", method, "--lr", lr, "--max-steps", steps,
                      "--out", run, "--force", *common, *extra], work / "logs" / f"finetune-{name}.txt")
    n = trainable(run, res)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(e["step"], e["val_loss"]) for e in evals if "val_loss" in e]
    return {"name": name, "method": method, "lr": lr, "run": str(run), "trainable": n, "params": res["params"],
            "val_curve": curve, "best_val_loss": res["best_val_loss"], "best_step": res["best_step"],
            "steps": res["steps"], "final_loss": res["final_loss"], "initial_loss": res["initial_loss"], "wall_s": wall}


def perplexity(work: Path, name: str, heldout: Path, device: str, adapter: Path | None = None,
               model: Path = MODEL, force_base: bool = False) -> tuple[dict, float]:
    extra = (["--adapter", adapter] if adapter else []) + (["--force-base"] if force_base else [])
    return lbdl(["eval", "perplexity", model, heldout, "--device", device, *extra],
                work / "logs" / f"perplexity-{name}.txt")


def task(work: Path, name: str, device: str, adapter: Path | None = None, model: Path = MODEL) -> dict:
    extra = ["--adapter", adapter] if adapter else []
    res, wall = lbdl(["eval", "task", model, TASKS / "arithmetic-test.jsonl", "--extract", "number",
                      "--device", device, *extra], work / "logs" / f"task-{name}.txt")
    samples = [(r["answer"], r["completion"]) for r in res.get("records", [])[:5]]
    return {"accuracy": res["accuracy"], "correct": res["correct"], "total": res["total"], "ci95": res["ci95"],
            "wall_s": wall, "samples": samples}


def fmt_share(n: int, total: int) -> str:
    return f"{100 * n / total:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path, help="work directory for the data files, runs and logs (created)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of every stdlib run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--lr-lora", type=float, default=1e-3, help="lr of the LoRA and QLoRA runs")
    ap.add_argument("--lr-full", type=float, default=1e-4, help="lr of the full run")
    ap.add_argument("--extra-lr-lora", type=float, default=None, help="one more LoRA and QLoRA run at this lr")
    ap.add_argument("--extra-lr-full", type=float, default=None, help="one more full run at this lr")
    ap.add_argument("--extra-targets", default=None,
                    help="one more LoRA run with these --targets (e.g. all-linear), at --extra-lr-lora or --lr-lora")
    ap.add_argument("--only-extra", action="store_true",
                    help="only the base and the optional runs (--extra-*, --arith-full)")
    ap.add_argument("--train-kb", type=int, default=300, help="stdlib source to train on, KB")
    ap.add_argument("--heldout-kb", type=int, default=48, help="held-out stdlib source, KB")
    ap.add_argument("--chunk-chars", type=int, default=4000, help="largest training record, characters")
    ap.add_argument("--arith-steps", type=int, default=80, help="optimizer steps of the arithmetic runs")
    ap.add_argument("--arith-full", action="store_true", help="also fine-tune every weight on arithmetic")
    ap.add_argument("--skip-domain", action="store_true")
    ap.add_argument("--skip-arith", action="store_true")
    ap.add_argument("--device", default="cpu", help="device of every lbdl command (cpu, as recorded)")
    ap.add_argument("--json", type=Path, default=None, help="also write every result to this JSON file")
    args = ap.parse_args()

    work = args.work.resolve()
    if work == ROOT or ROOT in work.parents:
        sys.exit(f"{work} is inside the repository; give a work directory outside it")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    machine = capabilities()
    print(f"machine: {machine}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    common = ["--batch-size", args.batch_size, "--context", args.context, "--seed", args.seed,
              "--eval-interval", args.eval_interval, "--eval-batches", args.eval_batches, "--device", args.device]
    out: dict = {"machine": machine, "python": sys.version.split()[0], "args": {k: str(v) for k, v in
                                                                                 vars(args).items()}}
    out["base_params"] = n_params(MODEL / "model.safetensors")
    t_start = time.perf_counter()

    if not args.skip_domain:
        data = stdlib_data(work, args.train_kb, args.heldout_kb, args.chunk_chars)
        out["stdlib_data"] = data
        print(f"stdlib {data['stdlib']}: {len(data['train_files'])} training files ({data['train_bytes']} bytes, "
              f"{data['train_records']} records), {len(data['heldout_files'])} held-out files "
              f"({data['heldout_bytes']} bytes): {', '.join(data['heldout_files'])}", flush=True)
        train_data, heldout = work / "stdlib-train.jsonl", work / "heldout.txt"
        plan = [] if args.only_extra else [("full", "full", args.lr_full, ()), ("lora", "lora", args.lr_lora, ()),
                                           ("qlora", "qlora", args.lr_lora, ())]
        if args.extra_lr_full is not None:
            plan.append((f"full-lr{args.extra_lr_full:g}", "full", args.extra_lr_full, ()))
        if args.extra_lr_lora is not None:
            plan += [(f"{m}-lr{args.extra_lr_lora:g}", m, args.extra_lr_lora, ()) for m in ("lora", "qlora")]
        if args.extra_targets:
            lr = args.extra_lr_lora if args.extra_lr_lora is not None else args.lr_lora
            plan.append((f"lora-{args.extra_targets}-lr{lr:g}", "lora", lr, ("--targets", args.extra_targets)))
        base_ppl, _ = perplexity(work, "base", heldout, args.device)
        rows = [{"name": "base", "method": "base", "ppl": base_ppl}]
        qbase = work / "base-nf4_dq"
        if any(m == "qlora" for _, m, _, _ in plan):  # QLoRA's frozen base as a model directory
            lbdl(["quantize", MODEL, "--type", "nf4_dq", "--recipe", "pure", "--embeddings", "keep", "--out", qbase,
                  "--force"], work / "logs" / "quantize-base.txt")
            rows.append({"name": "base-nf4_dq", "method": "base", "ppl": perplexity(work, "base-nf4_dq", heldout,
                                                                                    args.device, model=qbase)[0]})
        for name, method, lr, extra in plan:
            row = finetune(work, name, train_data, method, lr, common, args.steps, extra)
            run_best = Path(row["run"]) / "best"
            if method == "full":
                row["ppl"], _ = perplexity(work, name, heldout, args.device, model=run_best)
            else:
                row["ppl"], _ = perplexity(work, name, heldout, args.device, adapter=run_best)
            if method == "qlora":  # also on the quantized base it was trained on (its hash is the float base's)
                row["ppl_nf4"], _ = perplexity(work, f"{name}-nf4_dq", heldout, args.device, adapter=run_best,
                                               model=qbase, force_base=True)
            rows.append(row)
            print(f"  {name}: best val loss {row['best_val_loss']:.4f}, held-out perplexity "
                  f"{row['ppl']['perplexity']:.2f}, {row['wall_s']:.0f} s", flush=True)
        out["domain"] = rows

    if not args.skip_arith:
        arith = TASKS / "arithmetic-train.jsonl"
        rows = [{"name": "base", "method": "base", "task": task(work, "base", args.device)}]
        plan = ([] if args.only_extra else [("arith-lora", "lora", args.lr_lora)]) + (
            [("arith-full", "full", args.lr_full)] if args.arith_full else [])
        for name, method, lr in plan:
            row = finetune(work, name, arith, method, lr, common, args.arith_steps)
            run_best = Path(row["run"]) / "best"
            row["task"] = (task(work, name, args.device, model=run_best) if method == "full"
                           else task(work, name, args.device, adapter=run_best))
            rows.append(row)
            print(f"  {name}: best val loss {row['best_val_loss']:.4f}, accuracy {row['task']['accuracy']:.3f}",
                  flush=True)
        out["arithmetic"] = rows
    out["total_wall_s"] = time.perf_counter() - t_start

    print()
    print(f"machine: {machine}; Python {out['python']}; total {out['total_wall_s'] / 60:.1f} min")
    if "domain" in out:
        d = out["stdlib_data"]
        print(f"\n(a) stdlib domain adaptation: {args.steps} steps of {args.batch_size} x {args.context} tokens, "
              f"seed {args.seed}; {d['train_bytes'] / 1000:.0f} KB training source "
              f"({d['train_records']} records), held-out {d['heldout_bytes'] / 1000:.0f} KB\n")
        total = out["base_params"]
        print("| run | lr | trainable params | share | val loss by evaluation | best val loss (step) "
              "| held-out perplexity (± s.e.) | held-out bits/byte | wall (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in out["domain"]:
            p = r["ppl"]
            ppl = f"{p['perplexity']:.2f} ± {p['std_error']:.2f} | {p['bits_per_byte']:.3f}"
            if r["name"] == "base":
                print(f"| base (no fine-tuning) | - | - | - | - | - | {ppl} | - |")
            elif r["method"] == "base":
                print(f"| base, blocks in nf4_dq (QLoRA's frozen base) | - | - | - | - | - | {ppl} | - |")
            else:
                curve = " / ".join(f"{v:.4f}" for _, v in r["val_curve"])
                print(f"| {r['name']} | {r['lr']:g} | {r['trainable']:,} | {fmt_share(r['trainable'], total)} | "
                      f"{curve} | {r['best_val_loss']:.4f} ({r['best_step']}) | {ppl} | {r['wall_s']:.0f} |")
            if "ppl_nf4" in r:
                q = r["ppl_nf4"]
                print(f"| {r['name']}, adapter on the nf4_dq base | | | | | | {q['perplexity']:.2f} ± "
                      f"{q['std_error']:.2f} | {q['bits_per_byte']:.3f} | |")
    if "arithmetic" in out:
        print(f"\n(b) arithmetic exact match (arithmetic-test.jsonl, --extract number): {args.arith_steps} steps of "
              f"{args.batch_size} x {args.context} tokens on arithmetic-train.jsonl\n")
        print("| model | lr | trainable params | share | best val loss (step) | exact match | correct | 95% CI "
              "| wall (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in out["arithmetic"]:
            t = r["task"]
            acc = f"{t['accuracy']:.3f} | {t['correct']}/{t['total']} | [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]"
            if r["method"] == "base":
                print(f"| base (no fine-tuning) | - | - | - | - | {acc} | - |")
            else:
                print(f"| {r['name']} | {r['lr']:g} | {r['trainable']:,} | "
                      f"{fmt_share(r['trainable'], out['base_params'])} | {r['best_val_loss']:.4f} "
                      f"({r['best_step']}) | {acc} | {r['wall_s']:.0f} |")
        for r in out["arithmetic"]:
            print(f"\n{r['name']} first completions (answer: completion): "
                  + "; ".join(f"{a}: {c!r}" for a, c in r["task"]["samples"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
