"""Train a BPE tokenizer with sentencepiece, so that every string round-trips exactly.

The corpus is streamed line by line. A seeded fraction of lines is held out to
measure compression; of the rest at most `max_lines` are kept for training by
reservoir sampling (seeded), so memory is bounded whatever the corpus size and
the report says how much was sampled. sentencepiece's settings are chosen for
exact round trips: identity normalisation, no whitespace folding, no dummy
prefix, byte fallback, and line breaks as user-defined symbols.
"""

from __future__ import annotations

import io
import random
import re
import time

import sentencepiece as spm

from lbdl_cli.atomic import check_out
from lbdl_cli.errors import DataError
from lbdl_cli.progress import Progress, report

from .config import BOS, EOS, LINE_BREAKS, PAD, UNK, TokenizerConfig, reserved_ids
from .core import Tokenizer
from .corpus import TextFile, expand_files, total_bytes

LINE_CHARS = 4096  # longer training lines are cut into pieces this long (sentencepiece skips long lines)
HELDOUT_MAX_CHARS = 4_000_000  # held-out text kept for measuring compression
REPORT_BYTES = 1 << 20  # progress is reported about every MiB read


def sentencepiece_options(config: TokenizerConfig) -> dict:
    """The sentencepiece trainer settings lbdl uses (all of them, for the report)."""
    return dict(
        model_type="bpe",
        vocab_size=config.vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",  # no NFKC: text is kept as written
        remove_extra_whitespaces=False,  # keep leading, trailing and repeated spaces
        add_dummy_prefix=False,  # no space invented before the text
        allow_whitespace_only_pieces=True,  # runs of spaces (indentation) can be one piece
        split_digits=config.split_digits,
        character_coverage=config.character_coverage,
        user_defined_symbols=list(LINE_BREAKS),
        control_symbols=list(config.special_tokens),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        max_sentence_length=4 * LINE_CHARS,  # bytes; lines are cut to LINE_CHARS characters
        input_sentence_size=0,  # lbdl samples (seeded) before sentencepiece sees the text
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        minloglevel=2,
    )


def _read(files, config: TokenizerConfig, progress: Progress | None):
    """Stream the corpus: (training sample, held-out lines, counts)."""
    held_rng = random.Random(f"heldout-{config.seed}")
    sample_rng = random.Random(f"sample-{config.seed}")
    sample: list[str] = []
    heldout: list[str] = []
    held_chars = 0
    seen = 0  # training lines offered to the reservoir
    counts = {"lines": 0, "nonempty_lines": 0, "bytes": 0, "invalid_utf8_lines": 0, "empty_files": []}
    total = total_bytes(files)
    before = 0  # bytes of the files already read
    reported = 0
    k = config.max_lines
    for path in files:
        f = TextFile(path, config.invalid_utf8)
        for line in f:
            counts["lines"] += 1
            text = line[:-1] if line.endswith("\n") else line
            if not text.strip():
                continue
            counts["nonempty_lines"] += 1
            held = config.heldout_fraction and held_rng.random() < config.heldout_fraction
            if held and held_chars < HELDOUT_MAX_CHARS:
                heldout.append(text)
                held_chars += len(text) + 1
                continue
            pieces = [text] if len(text) <= LINE_CHARS else [text[i:i + LINE_CHARS]
                                                             for i in range(0, len(text), LINE_CHARS)]
            for piece in pieces:
                seen += 1
                if not k or len(sample) < k:
                    sample.append(piece)
                else:
                    j = sample_rng.randrange(seen)
                    if j < k:
                        sample[j] = piece
            if progress is not None and before + f.bytes_read - reported > REPORT_BYTES:
                reported = before + f.bytes_read
                report(progress, "reading", reported, total, unit="bytes")
        counts["bytes"] += f.bytes_read
        counts["invalid_utf8_lines"] += f.lines_skipped
        if f.bytes_read == 0:
            counts["empty_files"].append(str(path))
        before = reported = counts["bytes"]
        report(progress, "reading", before, total, unit="bytes")
    counts["training_lines_seen"] = seen
    return sample, heldout, counts


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _sentencepiece_train(sample: list[str], config: TokenizerConfig) -> bytes:
    writer = io.BytesIO()
    options = sentencepiece_options(config)
    options["num_threads"] = config.num_threads or _cpu_count()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=writer, **options)
    except RuntimeError as e:
        message = str(e)
        m = _TOO_HIGH.search(message)
        if m:
            raise DataError(f"vocabulary size {config.vocab_size} is too large for this corpus: it supports at most "
                            f"{m.group(2)}; lower --vocab-size or train on more text") from None
        m = _TOO_SMALL.search(message)
        if m:
            chars = int(m.group(2)) - reserved_ids(len(config.special_tokens))
            raise DataError(f"vocabulary size {config.vocab_size} is too small for this corpus: the special tokens, "
                            f"byte pieces and the corpus's {chars} characters need {m.group(2)}; raise --vocab-size "
                            f"or lower --character-coverage") from None
        raise
    return writer.getvalue()


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def train(files, vocab_size: int | None = None, *, config: TokenizerConfig | None = None, out=None,
          force: bool = False, progress: Progress | None = None, **options) -> Tokenizer:
    """Train a BPE tokenizer on text files (paths or globs); save it to `out` if given.

    The settings are `config`, or a TokenizerConfig of `vocab_size` and `options` (its other
    fields: special_tokens, character_coverage, split_digits, max_lines, heldout_fraction, seed,
    invalid_utf8, num_threads). Progress: bytes read ("reading"), lines trained on ("training"),
    held-out lines measured ("measuring"). The returned tokenizer's `.report` holds the training report.
    """
    if config is None:
        config = TokenizerConfig(**({} if vocab_size is None else {"vocab_size": vocab_size}), **options)
    elif vocab_size is not None or options:
        raise TypeError("train() takes a TokenizerConfig or its fields, not both")
    paths = expand_files(files)
    if out is not None:
        check_out(out, force, inputs=paths)
    start = time.perf_counter()
    sample, heldout, counts = _read(paths, config, progress)
    if not sample and heldout:  # so little text that every line was drawn for the held-out part
        sample, heldout = heldout, []
        counts["training_lines_seen"] = len(sample)
    if not sample:
        where = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise DataError(f"the corpus is empty (no text in {where}); pass files with text")
    read_seconds = time.perf_counter() - start
    report(progress, "training", 0, len(sample), unit="lines", status="sentencepiece")
    t0 = time.perf_counter()
    model = _sentencepiece_train(sample, config)
    sp_seconds = time.perf_counter() - t0
    tok = Tokenizer(model, num_threads=config.num_threads)
    report(progress, "training", len(sample), len(sample), unit="lines")
    measured = heldout or sample[:20_000]
    report(progress, "measuring", 0, len(measured), unit="lines", status="compression")
    held_text = "\n".join(measured)
    compression = tok.compression(held_text)
    compression["text"] = "held-out lines" if heldout else "training lines (no held-out part)"
    seconds = time.perf_counter() - start
    summary = {
        "vocab_size": tok.vocab_size,
        "files": [str(p) for p in paths],
        "bytes": counts["bytes"],
        "lines": counts["lines"],
        "nonempty_lines": counts["nonempty_lines"],
        "training_lines": len(sample),
        "training_lines_available": counts["training_lines_seen"],
        "sampled": counts["training_lines_seen"] > len(sample),
        "sampling": (f"reservoir sample of {len(sample):,} of {counts['training_lines_seen']:,} lines, "
                     f"seed {config.seed}" if counts["training_lines_seen"] > len(sample) else "every line"),
        "heldout_lines": len(heldout),
        "invalid_utf8_lines": counts["invalid_utf8_lines"],
        "empty_files": counts["empty_files"],
        "seconds": round(seconds, 3),
        "read_seconds": round(read_seconds, 3),
        "sentencepiece_seconds": round(sp_seconds, 3),
        "compression": compression,
        "longest_pieces": tok.longest_pieces(10),
        "special_tokens": tok.special_tokens,
        "config": config.to_dict(),
        "sentencepiece": {k: v for k, v in sentencepiece_options(config).items() if k != "minloglevel"},
    }
    tok.config = {"training": summary}
    report(progress, "measuring", len(measured), len(measured), unit="lines")
    if out is not None:
        tok.save(out, force=force)
    return tok
