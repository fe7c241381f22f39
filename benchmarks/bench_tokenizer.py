"""Tokenizer benchmark: lbdl (sentencepiece BPE) vs Hugging Face `tokenizers` byte-level BPE.

    python benchmarks/bench_tokenizer.py                 # tinyshakespeare + a ~50 MB corpus, median of 5
    python benchmarks/bench_tokenizer.py --runs 1 --big-mb 5   # a quick look

For each corpus, both tokenizers are trained at the same vocabulary size on the
same training text (every line: lbdl's default 1M-line sample is switched off
so both see the same text), then timed encoding that text in line-aligned 4 KiB
chunks through their batch APIs (both use every core). Compression (characters
and UTF-8 bytes per token) and the exact round trip are measured on held-out
text that is not in the training text:

- tinyshakespeare (data/tinyshakespeare.txt): the first 90% of its lines train,
  the last 10% are held out;
- python-stdlib: the UTF-8 `.py` files of this Python's standard library, every
  10th file (sorted by path) held out, the rest concatenated and repeated until
  the corpus is `--big-mb` MB. It is built in a temporary directory at run time.

Prints a markdown table (medians of `--runs` runs) and a line describing the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
CHUNK = 4096
LBDL = "lbdl (sentencepiece BPE)"
HF = "HF tokenizers byte-level BPE"


def machine() -> str:
    import sentencepiece
    import tokenizers
    from machine import capabilities  # benchmarks/machine.py

    return (f"{capabilities()}; {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"sentencepiece {sentencepiece.__version__}, tokenizers {tokenizers.__version__}")


def chunks(text: str, size: int = CHUNK) -> list[str]:
    """Line-aligned pieces of about `size` characters."""
    out, start, n = [], 0, len(text)
    while start < n:
        cut = text.find("\n", start + size)
        end = n if cut < 0 else cut + 1
        out.append(text[start:end])
        start = end
    return out


def stdlib_corpus(workdir: Path, mb: float) -> tuple[Path, str]:
    """(training file of `mb` MB, held-out text) from the standard library's .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train_texts, heldout = [], []
    for k, path in enumerate(files):
        data = path.read_bytes()
        if b"\x00" in data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text if text.endswith("\n") else text + "\n"
        (heldout if k % 10 == 0 else train_texts).append(text)
    target = int(mb * 1_000_000)
    out, size = [], 0
    while size < target:
        for text in train_texts:
            out.append(text)
            size += len(text.encode("utf-8"))
            if size >= target:
                break
    path = workdir / "python-stdlib.txt"
    path.write_text("".join(out), encoding="utf-8")
    return path, "".join(heldout)


def split_file(path: Path, workdir: Path) -> tuple[Path, str]:
    """(first 90% of the lines as a file, the last 10% as held-out text)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    train_path = workdir / f"{path.stem}.train.txt"
    train_path.write_text("".join(lines[:cut]), encoding="utf-8")
    return train_path, "".join(lines[cut:])


def median_time(fn, runs: int):
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_lbdl(train_path: Path, heldout: str, vocab_size: int, runs: int) -> dict:
    from tokenizer import train

    train_s, tok = median_time(lambda: train([train_path], vocab_size, heldout_fraction=0, max_lines=0), runs)
    text = train_path.read_text(encoding="utf-8")
    pieces = chunks(text)
    encode_s, _ = median_time(lambda: tok.encode_batch(pieces), runs)
    ids = tok.encode(heldout)
    return {"tokenizer": LBDL, "vocab_size": tok.vocab_size, "train_s": train_s,
            "encode_mb_s": len(text.encode("utf-8")) / encode_s / 1e6, "tokens": len(ids),
            "chars_per_token": len(heldout) / len(ids), "bytes_per_token": len(heldout.encode("utf-8")) / len(ids),
            "round_trip": tok.decode(ids) == heldout}


def bench_hf(train_path: Path, heldout: str, vocab_size: int, runs: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def train():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train([str(train_path)], trainer)
        return tok

    train_s, tok = median_time(train, runs)
    text = train_path.read_text(encoding="utf-8")
    pieces = chunks(text)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: the fastest batch path
    encode_s, _ = median_time(lambda: encode(pieces, add_special_tokens=False), runs)
    ids = tok.encode(heldout, add_special_tokens=False).ids
    return {"tokenizer": HF, "vocab_size": tok.get_vocab_size(), "train_s": train_s,
            "encode_mb_s": len(text.encode("utf-8")) / encode_s / 1e6, "tokens": len(ids),
            "chars_per_token": len(heldout) / len(ids), "bytes_per_token": len(heldout.encode("utf-8")) / len(ids),
            "round_trip": tok.decode(ids, skip_special_tokens=False) == heldout}


def run_corpus(name: str, path: Path, vocab_size: int, runs: int, workdir: Path,
               heldout: str | None = None) -> list[dict]:
    """Both tokenizers on one corpus; without `heldout`, the file's last 10% of lines is held out."""
    if heldout is None:
        path, heldout = split_file(Path(path), Path(workdir))
    size_mb = Path(path).stat().st_size / 1e6
    rows = []
    for bench in (bench_lbdl, bench_hf):
        row = bench(Path(path), heldout, vocab_size, runs)
        row.update({"corpus": name, "train_mb": size_mb, "heldout_mb": len(heldout.encode("utf-8")) / 1e6,
                    "runs": runs})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| corpus (training MB) | tokenizer | vocab | train (s) | encode (MB/s) | held-out chars/token "
             "| held-out bytes/token | exact round trip |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} ({r['train_mb']:.1f}) | {r['tokenizer']} | {r['vocab_size']} "
                     f"| {r['train_s']:.2f} "
                     f"| {r['encode_mb_s']:.2f} | {r['chars_per_token']:.3f} | {r['bytes_per_token']:.3f} "
                     f"| {'yes' if r['round_trip'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--big-mb", type=float, default=50, help="size of the generated corpus (0 skips it)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "tinyshakespeare.txt")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lbdl-bench-tok-") as tmp:
        workdir = Path(tmp)
        rows += run_corpus(args.corpus.stem, args.corpus, args.vocab_size, args.runs, workdir)
        if args.big_mb > 0:
            path, heldout = stdlib_corpus(workdir, args.big_mb)
            rows += run_corpus("python-stdlib", path, args.vocab_size, args.runs, workdir, heldout=heldout)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Machine: {machine()}; load average at the end {load}")
    print(f"Median of {args.runs} run(s); vocabulary {args.vocab_size}; both tokenizers train on every line.\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
