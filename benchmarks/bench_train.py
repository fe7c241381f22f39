"""Training throughput: `lbdl train`'s loop against a plain Hugging Face
GPT2LMHeadModel training loop of the same shape, batch, context and dtype,
measured in the same run on this machine.

    python benchmarks/bench_train.py [--preset micro] [--steps 8] [--repeats 5] [--no-compile]

Both sides run AdamW steps on the same random token batches; the first steps
(warm-up, compilation) are excluded. Each cell is the median tokens/s of
--repeats measurements. MFU is against the matmul peak measured at start in
the same dtype (lbdl's own probe). Needs the `bench` extra (transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import capabilities  # benchmarks/machine.py


def make_shards(root: Path, vocab: int, tokens: int) -> Path:
    """Random-token shards in `lbdl data prepare`'s format (speed does not depend on the text)."""
    import hashlib

    from tokenizer import train as train_tokenizer

    text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text()[:300_000]
    (root / "t.txt").write_text(text)
    tok = train_tokenizer([root / "t.txt"], vocab_size=vocab, out=root / "tok")
    shards = root / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, tokens, dtype=np.uint16).tofile(shards / "train.bin")
    rng.integers(0, vocab, tokens // 10, dtype=np.uint16).tofile(shards / "val.bin")
    model_bytes = (root / "tok" / "tokenizer.model").read_bytes()
    (shards / "tokenizer.model").write_bytes(model_bytes)
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": tok.vocab_size,
            "tokenizer_sha256": hashlib.sha256(model_bytes).hexdigest(), "train_tokens": tokens,
            "val_tokens": tokens // 10}
    (shards / "meta.json").write_text(json.dumps(meta))
    return shards


def lbdl_tokens_per_s(shards: Path, preset: str, batch: int, context: int, dtype: str, compile: bool,
                      steps: int, warmup: int, out: Path) -> float:
    from lbdl_cli.train import TrainConfig, distributed
    from lbdl_cli.train.loop import Trainer
    from lbdl_cli.train.pretrain import pretraining_parts

    times = []
    cfg = TrainConfig(data=str(shards), out=str(out), preset=preset, batch_size=batch, context=context,
                      max_steps=warmup + steps, eval_interval=10**9, log_interval=10**9, dtype=dtype,
                      compile=compile, peak_tflops=1.0)
    with distributed.session(cfg.device) as dist:
        trainer = Trainer(cfg, pretraining_parts(cfg, dist), dist, force=True)
        step = trainer.train_step

        def timed():
            t = time.perf_counter()
            result = step()
            times.append(time.perf_counter() - t)
            return result

        trainer.train_step = timed
        trainer.fit()
    return batch * context * steps / sum(times[warmup:])


def hf_tokens_per_s(shards: Path, model_cfg, batch: int, context: int, dtype: str, compile: bool,
                    steps: int, warmup: int) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model_cfg
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    hf.config._attn_implementation = "sdpa"
    hf.train()
    model = torch.compile(hf) if compile else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = np.memmap(shards / "train.bin", dtype=np.uint16, mode="r")
    g = torch.Generator().manual_seed(0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(warmup + steps):
        starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=g).tolist()
        x = torch.from_numpy(np.stack([np.asarray(tokens[s:s + context], dtype=np.int64) for s in starts]))
        t = time.perf_counter()
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * context * steps / sum(times[warmup:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="only the rows without torch.compile")
    parser.add_argument("--only-compile", action="store_true", help="only the rows with torch.compile")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from lbdl_cli.checkpoint import load_preset
    from lbdl_cli.model import flops_per_token
    from lbdl_cli.train.loop import measure_peak_tflops

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root, 4096, 400_000)
        vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
        model_cfg = load_preset(args.preset)[0].replace(vocab_size=vocab, dropout=0.0)
        flops = flops_per_token(model_cfg, args.context, training=True)
        for dtype in args.dtypes.split(","):
            peak = measure_peak_tflops("cpu", torch.bfloat16 if dtype == "bfloat16" else None, seconds=1.0)
            for compile in ((False,) if args.no_compile else (True,) if args.only_compile else (False, True)):
                warmup = args.warmup + (2 if compile else 0)
                ours, peer = [], []
                for r in range(args.repeats):  # interleaved, so drift hits both sides alike
                    ours.append(lbdl_tokens_per_s(shards, args.preset, args.batch, args.context, dtype, compile,
                                                  args.steps, warmup, root / "run"))
                    peer.append(hf_tokens_per_s(shards, model_cfg, args.batch, args.context, dtype, compile,
                                                args.steps, warmup))
                a, b = statistics.median(ours), statistics.median(peer)
                row = dict(dtype=dtype, compile=compile, lbdl_tokens_per_s=a, hf_tokens_per_s=b, ratio=a / b,
                           lbdl_mfu=a * flops / (peak * 1e12), hf_mfu=b * flops / (peak * 1e12), peak_tflops=peak)
                rows.append(row)
                print(json.dumps(row), flush=True)

    print()
    print(f"`{args.preset}` preset ({model_cfg.n_layer} layers, n_embd {model_cfg.n_embd}, vocab {vocab}), "
          f"batch {args.batch} x context {args.context}, AdamW, median of {args.repeats}")
    print(f"machine: {capabilities()}")
    print()
    print("| dtype | compile | lbdl tokens/s | HF GPT2LMHeadModel tokens/s | lbdl / HF | lbdl MFU | HF MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {'yes' if r['compile'] else 'no'} | {r['lbdl_tokens_per_s']:,.0f} | "
              f"{r['hf_tokens_per_s']:,.0f} | {r['ratio']:.2f}x | {100 * r['lbdl_mfu']:.1f}% | "
              f"{100 * r['hf_mfu']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
