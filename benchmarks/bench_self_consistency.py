"""Self-consistency (issue #15): K sampled chains of one prompt, lbdl's shared-prefill batch against K sequential
lbdl generations and against transformers, on the same weights.

    python benchmarks/bench_self_consistency.py [--models default,gpt2-124m] [--k 10] [--new-tokens 128]
                                                [--repeats 3] [--threads N] [--json FILE]

Models: the bundled `models/default` (as shipped) and a random `gpt2-124m`-shaped model (seed 0, no download),
each saved by lbdl (`save_model`) and exported with `export_hf`, so both tools run the same weights. The prompt
is a few-shot arithmetic prompt from data/tasks/arithmetic-train.jsonl (whole records, as many as fit in
--prompt-tokens, and at most the model's context less the new tokens, so that no window slides), encoded with the
bundled tokenizer; every setting gets the same token ids. All in float32, one process, the model of each tool
loaded once (start-up is not measured); each setting runs one warm-up call, then --repeats timed calls, the three
settings alternating within each repeat (the order reversed every other repeat):

- lbdl batch: `generate(model, tok, [ids], SamplingConfig(temperature=0.8, max_new_tokens=N, ignore_eos=True,
  seed=S), num_samples=K)`, one call: the K chains share the prompt's prefill (one forward) and decode as one
  batch of K rows.
- lbdl sequential: K calls of the same `generate` with num_samples=1 (seed S + i): K prefills, K decodes of one row.
- transformers: `AutoModelForCausalLM.from_pretrained(hf_dir, dtype=float32, attn_implementation="sdpa")`,
  `model.generate(input_ids, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=N,
  min_new_tokens=N, num_return_sequences=K)` under `torch.inference_mode()` (top_k=0 turns off transformers'
  default top-k of 50, as lbdl samples from the whole distribution; min_new_tokens = ignore_eos).

Reported: the median wall seconds per setting (K chains of N tokens), K * N / seconds, and the ratios of lbdl
batch's speed to the sequential path (target >= 3) and to transformers (target >= 1.5). Needs transformers (the
`test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("lbdl-batch", "lbdl-sequential", "transformers")
LABELS = {"lbdl-batch": "lbdl batch (shared prefill)", "lbdl-sequential": "lbdl sequential (K calls)",
          "transformers": "transformers num_return_sequences"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fewshot_prompt(tok, max_tokens: int, path: Path) -> list[int]:
    """Token ids of whole arithmetic records (question and answer) followed by one question, within max_tokens."""
    from lbdl_cli.sample import encode_prompt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    question, shots = records[0]["prompt"], ""
    for rec in records[1:]:
        longer = shots + rec["prompt"] + rec["completion"] + "\n"
        if len(encode_prompt(tok, longer + question)) > max_tokens:
            break
        shots = longer
    return encode_prompt(tok, shots + question)


def prepare(name: str, root: Path) -> tuple[Path, Path, dict]:
    """The model saved by lbdl (the bundled one as it is, or a preset at random init, seed 0) and its export."""
    import torch

    from lbdl_cli.checkpoint import load_preset, save_model
    from lbdl_cli.checkpoint.hf import export_hf
    from lbdl_cli.model import GPT

    if name == "default":
        model_dir = ROOT / "models" / "default"
    else:
        cfg = load_preset(name)[0].replace(dropout=0.0)
        torch.manual_seed(0)
        model_dir = root / f"{name}-lbdl"
        save_model(GPT(cfg), model_dir)
    hf_dir = root / f"{name}-hf"
    export_hf(model_dir, hf_dir)
    return model_dir, hf_dir


def load_lbdl(name: str, model_dir: Path):
    """(model, tokenizer or None): the bundled model through load_for_inference; a preset (no tokenizer) through
    load_model and the same kernel layout."""
    import torch

    from lbdl_cli import kernels
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.sample import load_for_inference

    if name == "default":
        model, tok, _ = load_for_inference(model_dir, dtype="float32")
        return model, tok
    model, _ = load_model(model_dir, dtype=torch.float32)
    model.eval()
    kernels.inference_layout(model.matrices())
    return model, None


def runners(name: str, model_dir: Path, hf_dir: Path, ids: list[int], args) -> tuple[dict, dict]:
    """A callable per setting (each returns its chains' new-token counts), and the shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    from lbdl_cli.sample import SamplingConfig, generate

    model, tok = load_lbdl(name, model_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    k, n = args.k, args.new_tokens

    def cfg(seed):
        return SamplingConfig(temperature=args.temperature, max_new_tokens=n, ignore_eos=True, seed=seed)

    def batch():
        return [len(g.token_ids) for g in generate(model, tok, [ids], cfg(args.seed), num_samples=k)]

    def sequential():
        return [len(generate(model, tok, [ids], cfg(args.seed + i))[0].token_ids) for i in range(k)]

    x = torch.tensor([ids])  # (1, L)

    def transformers():
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=args.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, num_return_sequences=k,
                              pad_token_id=hf.config.eos_token_id if hf.config.eos_token_id is not None else 0)
        return [out.shape[1] - x.shape[1]] * out.shape[0]

    c = model.config
    shape = dict(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, vocab_size=c.vocab_size,
                 block_size=c.block_size, params=sum(p.numel() for p in model.parameters()),
                 prompt_tokens=len(ids))
    return {"lbdl-batch": batch, "lbdl-sequential": sequential, "transformers": transformers}, shape


def measure(fns: dict, args, label: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {s: [] for s in fns}
    for s, fn in fns.items():  # warm-up, excluded
        counts = fn()
        if len(counts) != args.k or any(c != args.new_tokens for c in counts):
            raise SystemExit(f"{label} {s}: expected {args.k} chains of {args.new_tokens} tokens, got {counts}")
    order = list(fns)
    for r in range(args.repeats):
        for s in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fns[s]()
            times[s].append(time.perf_counter() - t)
            print(f"{label} {s} #{r}: {times[s][-1]:.3f} s, load {load_average()}", flush=True)
    return times


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,gpt2-124m", help="'default' (the bundled model) or presets")
    parser.add_argument("--k", type=int, default=10, help="chains per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per chain")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="the few-shot prompt's length at most")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting, after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import capabilities  # benchmarks/machine.py

    from lbdl_cli.checkpoint import model_tokenizer, read_config

    torch.set_grad_enabled(False)
    started, load_before = time.perf_counter(), load_average()
    print(f"machine: {capabilities()}", flush=True)
    print(f"load average (1, 5, 15 min) before: {load_before}", flush=True)
    tok = model_tokenizer(ROOT / "models" / "default")
    tasks = ROOT / "data" / "tasks" / "arithmetic-train.jsonl"
    rows, shapes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir, hf_dir = prepare(name, Path(tmp))
            block = read_config(model_dir)["model"]["block_size"]
            ids = fewshot_prompt(tok, min(args.prompt_tokens, block - args.new_tokens), tasks)
            fns, shape = runners(name, model_dir, hf_dir, ids, args)
            shapes[name] = shape
            times = measure(fns, args, name)
            row = dict(model=name, prompt_tokens=len(ids))
            for s in SETTINGS:
                sec = statistics.median(times[s])
                row[s] = dict(seconds=sec, runs=times[s], tokens_per_s=args.k * args.new_tokens / sec)
            row["speed_vs_sequential"] = row["lbdl-sequential"]["seconds"] / row["lbdl-batch"]["seconds"]
            row["speed_vs_transformers"] = row["transformers"]["seconds"] / row["lbdl-batch"]["seconds"]
            rows.append(row)
            del fns
    load_after = load_average()
    elapsed = time.perf_counter() - started

    print()
    print(f"K = {args.k} chains of {args.new_tokens} new tokens (temperature {args.temperature:g}, ignore_eos, "
          f"seed {args.seed}), one few-shot arithmetic prompt; float32; median wall seconds of {args.repeats} "
          f"calls per setting after one warm-up, alternating")
    print(f"machine: {capabilities()}")
    print(f"load average before {load_before}, after {load_after}; {elapsed:.0f} s in all")
    for name, s in shapes.items():
        print(f"`{name}`: {s['n_layer']} layers, n_embd {s['n_embd']}, vocab {s['vocab_size']}, context "
              f"{s['block_size']}, {s['params'] / 1e6:.1f}M parameters; prompt {s['prompt_tokens']} tokens")
    print()
    print("| model | prompt tokens | setting | seconds (K chains) | new tokens/s |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        for s in SETTINGS:
            print(f"| {r['model']} | {r['prompt_tokens']} | {LABELS[s]} | {r[s]['seconds']:.3f} | "
                  f"{r[s]['tokens_per_s']:.0f} |")
    print()
    print("| model | sequential s / batch s (>= 3) | transformers s / batch s (>= 1.5) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['speed_vs_sequential']:.2f} "
              f"({'met' if r['speed_vs_sequential'] >= 3 else 'not met'}) | {r['speed_vs_transformers']:.2f} "
              f"({'met' if r['speed_vs_transformers'] >= 1.5 else 'not met'}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=capabilities(), load_before=load_before,
                                                    load_after=load_after, seconds=elapsed, shapes=shapes,
                                                    args=vars(args), rows=rows), indent=2))


if __name__ == "__main__":
    main()
