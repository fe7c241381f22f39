"""LBDL 8.4 at small scale (docs/MERGING.md): task vectors of two fine-tunes of the bundled model, merged.

    python benchmarks/demo_merge.py WORKDIR [--steps 150] [--batch-size 8] [--context 128] [--lr 3e-3]
        [--trials 24] [--density 0.5] [--json FILE]

Two LoRA fine-tunes of models/default (`lbdl finetune`, the same steps, batch, context, seed and lr): task 1 on
data/tasks/facts-train.jsonl (question/answer pairs of an invented world), task 2 on
data/tasks/arithmetic-train.jsonl (word problems, the answer only). Each adapter is its task vector (s B A per
adapted matrix); `lbdl merge --base models/default --model ADAPTER ...` merges them without a full fine-tune.

Each task's test file (data/tasks/facts-test.jsonl, arithmetic-test.jsonl) is split in two: the first half (dev)
is what `lbdl merge search` scores its candidates on, the second half (test) is what every row of the table is
scored on, so the searched merge is not scored on the records it was tuned on. The score is the mean NLL of the
completion tokens given the prompt (`merge.score.score_dir`, metric loss: lower is better); each task's "gain"
is base loss - loss, and "kept" is a merge's gain as a share of that task's own fine-tune's gain.

Rows: base; fine-tune 1 and 2 (each adapter alone, weight 1); task arithmetic (weights 1, 1); TIES and DARE-TIES
(density --density, weights 1, 1; DARE seeded); the searched merge (CMA-ES, --trials, params space: a weight per
model and block); base - tau_1 (task arithmetic, weight -1). Every step is a subprocess of the lbdl CLI
(`python -m lbdl_cli ... --json`), its output logged in WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lbdl_run import lbdl  # noqa: E402  (benchmarks/lbdl_run.py)
from machine import capabilities  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "default"
TASKS = ROOT / "data" / "tasks"


def split(name: str, work: Path) -> tuple[Path, Path]:
    """(dev, test): the two halves of a task's test file."""
    lines = (TASKS / f"{name}-test.jsonl").read_text().splitlines()
    half = len(lines) // 2
    dev, test = work / f"{name}-dev.jsonl", work / f"{name}-heldout.jsonl"
    dev.write_text("\n".join(lines[:half]) + "\n")
    test.write_text("\n".join(lines[half:]) + "\n")
    return dev, test


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = {"facts": split("facts", work), "arithmetic": split("arithmetic", work)}

    adapters = {}
    for name in tasks:
        run = work / f"ft-{name}"
        if not (run / "best" / "adapter_config.json").is_file():
            lbdl(["finetune", MODEL, TASKS / f"{name}-train.jsonl", "--out", run, "--force", "--max-steps", args.steps,
                  "--batch-size", args.batch_size, "--context", args.context, "--lr", args.lr,
                  "--eval-interval", args.steps, "--compute-dtype", "float32"], work / f"ft-{name}.log")
        adapters[name] = run / "best"
    a1, a2 = adapters["facts"], adapters["arithmetic"]
    base = ["--base", MODEL]
    merges = {
        "fine-tune 1 (facts)": [*base, "--model", a1],
        "fine-tune 2 (arithmetic)": [*base, "--model", a2],
        "task arithmetic": [*base, "--model", a1, "--model", a2],
        "TIES": [*base, "--method", "ties", "--density", args.density, "--model", a1, "--model", a2],
        "DARE-TIES": [*base, "--method", "dare_ties", "--density", args.density, "--seed", 0, "--model", a1,
                      "--model", a2],
        "base - tau_1": [*base, "--model", a1, "--weight", -1],
    }
    dirs = {"base": MODEL}
    for label, merge_args in merges.items():
        out = work / label.split(" (")[0].replace(" ", "-").replace("_", "")
        lbdl(["merge", *merge_args, "--out", out, "--force"], work / f"{out.name}.log")
        dirs[label] = out
    searched = work / "searched"
    search, _ = lbdl(["merge", "search", *base, "--model", a1, "--model", a2, "--eval", tasks["facts"][0],
                   "--eval", tasks["arithmetic"][0], "--space", "params", "--trials", args.trials, "--seed", 0,
                   "--out", searched, "--force"], work / "search.log")
    dirs["searched merge"] = searched

    from lbdl_cli.merge.score import score_dir

    scores = {}
    for label, d in dirs.items():
        result = score_dir(str(d), [str(tasks["facts"][1]), str(tasks["arithmetic"][1])])
        scores[label] = dict(zip(tasks, result["scores"].values()))
        print(label, scores[label], flush=True)
    gain = {t: scores["base"][t] - scores[f"fine-tune {i + 1} ({t})"][t] for i, t in enumerate(tasks)}

    print()
    print(f"machine: {capabilities()}")
    print(f"LoRA rank 8 alpha 16 (q, k, v, o), {args.steps} steps of {args.batch_size} x {args.context}, lr {args.lr}; "
          f"TIES/DARE density {args.density}; search: {args.trials} trials, params space, on the dev halves; "
          f"{time.perf_counter() - started:.0f} s in all")
    print()
    print("| model | facts loss | facts kept | arithmetic loss | arithmetic kept |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for label, s in scores.items():
        kept = {t: (scores["base"][t] - s[t]) / gain[t] if gain[t] > 0 else float("nan") for t in tasks}
        rows.append(dict(model=label, **{f"{t}_loss": s[t] for t in tasks}, **{f"{t}_kept": kept[t] for t in tasks}))
        print(f"| {label} | {s['facts']:.4f} | {100 * kept['facts']:.0f}% | {s['arithmetic']:.4f} | "
              f"{100 * kept['arithmetic']:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=capabilities(), args=vars(args) | {"work": str(work)},
                                                    rows=rows, search=search), indent=2, default=str))


if __name__ == "__main__":
    main()
