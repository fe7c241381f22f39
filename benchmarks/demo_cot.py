"""LBDL figure 8.1 at small scale: the chain of thought against the direct answer, and self-consistency, on
arithmetic word problems with more steps than any seen in training.

    python benchmarks/demo_cot.py WORKDIR [--train 80000] [--cot-share 0.75] [--steps 3000] [--batch-size 8]
        [--lr 3e-3] [--test 200] [--chains 10] [--temperature 0.7] [--model DIR] [--png FILE] [--json FILE]

Every step is a subprocess of the `lbdl` CLI (`--json`, its last line read); data, runs and logs go into WORKDIR.

1. Data, from data/make_tasks.py's generator (seeded): --train distinct problems of 2-4 operations, a share
   --cot-share of them answered step by step ({"prompt": "Q: ... A: Let's proceed step by step:",
   "completion": " Paul has 84 shells. He gives Sam 39 shells (45 left). ... So 88 shells remain.\\n"}), the
   others directly ({"prompt": "Q: ... A:", "completion": " 88\\n"}): the trigger, part of the prompt, says
   which kind of answer follows. Held out, none of them in the training set: --test problems of 5 operations
   (more than any training problem) and, for reference, --test of 2-4.
2. The model: `lbdl init --preset llama-tiny` (4.9M parameters, rotary positions, context 512) with the
   bundled tokenizer (digits are one byte token each), trained from scratch on the records by `lbdl finetune
   --method full` (the loss on the completions only). --model DIR skips this and evaluates DIR.
3. `lbdl eval task MODEL TEST --compare direct --compare cot --compare self-consistency --self-consistency
   --chains --temperature T --extract last-number`: the greedy direct answer, the greedy chain of thought
   (zero-shot: the query ends with the trigger) and --chains sampled chains, with the paired differences
   (McNemar). Self-consistency at K = 1 .. --chains is the majority over the first K of those same chains (K=1:
   one sampled chain); the curve goes to --png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
from lbdl_run import ROOT, lbdl  # noqa: E402  (benchmarks/lbdl_run.py)
from machine import capabilities  # noqa: E402  (benchmarks/machine.py)
from make_tasks import COT_TRIGGER, arithmetic_problem  # noqa: E402  (data/make_tasks.py)

from lbdl_cli.evaluate import wilson_interval  # noqa: E402
from lbdl_cli.prompting import extract_answer, is_correct, majority_vote  # noqa: E402

TOKENIZER = ROOT / "models" / "default" / "tokenizer.model"
SPLITS = {"held-out, 5 steps": (5, 5), "in distribution, 2-4 steps": (2, 4)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_data(work: Path, n_train: int, n_test: int, cot_share: float, seed: int) -> tuple[Path, dict[str, Path]]:
    """The training records (a share `cot_share` step by step, the others direct) and a test file per split, no
    prompt in two."""
    rng = random.Random(seed)
    seen, train = set(), []
    while len(train) < n_train:
        r = arithmetic_problem(rng, (2, 4))
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        if rng.random() < cot_share:
            assert r["cot_completion"].startswith(COT_TRIGGER)
            train.append({"prompt": r["prompt"] + COT_TRIGGER, "completion": r["cot_completion"][len(COT_TRIGGER):]})
        else:
            train.append({"prompt": r["prompt"], "completion": r["completion"]})
    tests = {}
    for name, steps in SPLITS.items():
        records = []
        while len(records) < n_test:
            r = arithmetic_problem(rng, steps)
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                records.append({"prompt": r["prompt"], "answer": r["answer"], "n_steps": r["n_steps"]})
        tests[name] = write_jsonl(work / f"test-{steps[0]}-{steps[1]}.jsonl", records)
    return write_jsonl(work / "train.jsonl", train), tests


def train(work: Path, data: Path, args) -> tuple[Path, dict, float]:
    init = work / "init"
    lbdl(["init", "--preset", "llama-tiny", "--out", init, "--force", "--seed", args.seed], work / "init.log")
    shutil.copy(TOKENIZER, init / "tokenizer.model")
    run = work / "run"
    result, wall = lbdl(["finetune", init, data, "--method", "full", "--lr", args.lr, "--max-steps", args.steps,
                         "--batch-size", args.batch_size, "--context", 512, "--warmup", args.warmup,
                         "--val-fraction", 0.02, "--eval-interval", args.steps // 4, "--log-interval", 50,
                         "--seed", args.seed, "--out", run, "--force"], work / "finetune.log")
    return run / "best", result, wall


def sc_curve(run: dict, chains: int) -> list[dict]:
    """Accuracy of the majority over the first K chains of each record, K = 1 .. chains."""
    out = []
    for k in range(1, chains + 1):
        hits = 0
        for rec in run["records"]:
            answers = [extract_answer(t, "last-number") for t in rec["completions"][:k]]
            hits += is_correct(majority_vote(answers)[0], rec, "last-number")
        n = len(run["records"])
        out.append({"k": k, "accuracy": hits / n, "correct": hits, "total": n, "ci95": list(wilson_interval(hits, n))})
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), sharey=True, squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        curve = res["curve"]
        ks, acc = [c["k"] for c in curve], [c["accuracy"] for c in curve]
        err = [[a - c["ci95"][0] for a, c in zip(acc, curve)], [c["ci95"][1] - a for a, c in zip(acc, curve)]]
        ax.errorbar(ks, acc, yerr=err, marker="o", capsize=3, label="self-consistency (majority of K sampled chains)")
        for label, style in (("cot", "--"), ("direct", ":")):
            row = res["strategies"][label]
            ax.axhline(row["accuracy"], linestyle=style, color="k" if label == "direct" else "tab:green",
                       label=f"{'chain of thought' if label == 'cot' else 'direct answer'}, greedy")
        ax.set_title(name)
        ax.set_xlabel("chains K")
        ax.set_xticks(ks)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--train", type=int, default=80000, help="training problems")
    p.add_argument("--cot-share", type=float, default=0.75, help="share of them answered step by step")
    p.add_argument("--test", type=int, default=200, help="problems per test split")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--chains", type=int, default=10)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="evaluate this model directory instead of training one")
    p.add_argument("--png", type=Path, help="where the curve goes (default WORKDIR/cot.png)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data, tests = make_data(work, args.train, args.test, args.cot_share, args.seed)
    trained, train_wall = None, 0.0
    model = args.model
    if model is None:
        model, trained, train_wall = train(work, data, args)
    results = {}
    for name, path in tests.items():
        res, wall = lbdl(["eval", "task", model, path, "--compare", "direct", "--compare", "cot", "--compare",
                          "self-consistency", "--self-consistency", args.chains, "--temperature", args.temperature,
                          "--extract", "last-number", "--max-new-tokens", 192, "--seed", args.seed],
                         work / f"eval-{path.stem}.log")
        sc = res["runs"][2]
        results[name] = {"strategies": {r["strategy"]: r for r in res["strategies"]}, "paired": res["paired"],
                         "curve": sc_curve(sc, args.chains), "seconds": wall}
    total = time.perf_counter() - started

    print()
    print(f"machine: {capabilities()}")
    if trained is not None:
        print(f"training: llama-tiny from scratch, {args.train} problems, {args.steps} steps of {args.batch_size} x "
              f"512 tokens, lr {args.lr}: best val loss {trained.get('best_val_loss')}, {train_wall:.0f} s")
    print(f"sampling: temperature {args.temperature}, {args.chains} chains; {total:.0f} s in all")
    print()
    shown = sorted(k for k in {1, 5, args.chains} if k <= args.chains)
    print("| test split | direct | chain of thought | " + " | ".join(f"SC K={k}" for k in shown) + " | eval (s) |")
    print("|---|---:|---:|" + "---:|" * len(shown) + "---:|")
    for name, res in results.items():
        cells = [f"{res['strategies'][s]['accuracy']:.3f} [{res['strategies'][s]['ci95'][0]:.2f}, "
                 f"{res['strategies'][s]['ci95'][1]:.2f}]" for s in ("direct", "cot")]
        cells += [f"{res['curve'][k - 1]['accuracy']:.3f}" for k in shown]
        print(f"| {name} | " + " | ".join(cells) + f" | {res['seconds']:.0f} |")
    print()
    for name, res in results.items():
        for pair in res["paired"]:
            print(f"{name}: {pair['b']} - {pair['a']} = {pair['difference']:+.3f}, 95% CI [{pair['ci95'][0]:+.3f}, "
                  f"{pair['ci95'][1]:+.3f}], McNemar p = {pair['mcnemar_p']:.2g}")
        curve = res["curve"]
        print(f"{name}: self-consistency K=1..{args.chains}: " + " ".join(f"{c['accuracy']:.3f}" for c in curve))
    png = args.png or work / "cot.png"
    what = (f"llama-tiny (4.9M) trained from scratch on {args.train} problems of 2-4 steps" if args.model is None
            else str(args.model))
    plot(results, png, f"{what}; sampling at T={args.temperature}")
    print(f"curve: {png}")
    if args.json:
        args.json.write_text(json.dumps({"machine": capabilities(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "training": trained, "training_seconds": train_wall, "seconds": total,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
