"""`lbdl tokenizer train|encode|decode|inspect`: BPE tokenizers (the `tokenizer` package)."""

from __future__ import annotations

import json
import sys

import typer

from tokenizer.config import INVALID_UTF8_CHOICES, TrainConfig

from ..errors import DataError
from .output import FORCE_OPTION, JSON_OPTION, console, emit, esc, human_bytes, kv_table, progress

DEFAULTS = TrainConfig()
app = typer.Typer(help="Train and use BPE tokenizers (sentencepiece, exact round trips).", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="tokenizer")


def _read_arg(value: str, what: str) -> str:
    """The argument itself, or all of stdin (read as UTF-8 bytes, newlines kept exactly) for '-'."""
    if value != "-":
        return value
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} on stdin is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None


def _progress_callback(update):
    state = {"done": 0}

    def callback(stage: str, done: int, total: int):
        if stage in ("reading", "tokenizing"):
            update(advance=max(0, done - state["done"]), total=total, status="")
            state["done"] = max(state["done"], done)
        elif stage == "training" and done == 0:
            update(advance=0, status="training sentencepiece...")
        elif stage == "measuring" and done == 0:
            update(advance=0, status="measuring compression...")

    return callback


@app.command("train")
def train(
    files: list[str] = typer.Argument(..., metavar="FILES", help="Text files or globs (quote globs; `**` recurses)."),
    vocab_size: int = typer.Option(DEFAULTS.vocab_size, "--vocab-size", help="Vocabulary size, special tokens included."),
    out: str = typer.Option(..., "--out", help="Output tokenizer directory."),
    special_tokens: list[str] = typer.Option([], "--special-tokens",
                                             help="Extra special tokens, comma-separated or repeated (e.g. '<|user|>,<|assistant|>')."),
    character_coverage: float = typer.Option(DEFAULTS.character_coverage, "--character-coverage",
                                             help="Share of characters that get their own piece; rarer ones are spelled in bytes."),
    split_digits: bool = typer.Option(DEFAULTS.split_digits, "--split-digits/--no-split-digits",
                                      help="Make every digit its own token."),
    max_lines: int = typer.Option(DEFAULTS.max_lines, "--max-lines",
                                  help="Train on a seeded reservoir sample of at most this many lines (0 = all)."),
    heldout_fraction: float = typer.Option(DEFAULTS.heldout_fraction, "--heldout-fraction",
                                           help="Share of lines held out (seeded) to measure compression."),
    invalid_utf8: str = typer.Option(DEFAULTS.invalid_utf8, "--invalid-utf8",
                                     help=f"What to do with invalid UTF-8: {' | '.join(INVALID_UTF8_CHOICES)}."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed for the held-out draw and the line sample."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Train a byte-fallback BPE tokenizer; writes DIR/tokenizer.model (+ tokenizer_config.json)."""
    from tokenizer import train as train_tokenizer

    specials = [t.strip() for item in special_tokens for t in item.split(",") if t.strip()]
    with progress("reading corpus", quiet=as_json) as update:
        tok = train_tokenizer(files, vocab_size, out=out, force=force, progress=_progress_callback(update),
                              special_tokens=specials, character_coverage=character_coverage,
                              split_digits=split_digits, max_lines=max_lines, heldout_fraction=heldout_fraction,
                              invalid_utf8=invalid_utf8, seed=seed)
    r = tok.report
    result = {"out": out, "tokenizer_sha256": tok.sha256, **r}

    def render():
        from tokenizer import display_piece

        c = r["compression"]
        n_files = len(r["files"])
        console.print(f"trained {esc(out)}/tokenizer.model: vocabulary {r['vocab_size']:,} in {r['seconds']:.1f} s "
                      f"(sentencepiece {r['sentencepiece_seconds']:.1f} s)")
        rows = {
            "corpus": f"{n_files} file{'s' if n_files != 1 else ''}, {human_bytes(r['bytes'])}, "
                      f"{r['nonempty_lines']:,} non-empty lines",
            "trained on": f"{r['training_lines']:,} lines ({r['sampling']})",
            f"compression ({c['text']})": f"{c['chars_per_token']:.2f} chars/token, {c['bytes_per_token']:.2f} bytes/token "
                                          f"({c['tokens']:,} tokens for {c['chars']:,} chars)",
            "special tokens": " ".join(f"{k}={v}" for k, v in r["special_tokens"].items()),
            "longest pieces": "  ".join(repr(display_piece(p))[1:-1] for p in r["longest_pieces"]),
            "sha256": tok.sha256[:16],
        }
        if r["invalid_utf8_lines"]:
            rows["invalid UTF-8"] = f"{r['invalid_utf8_lines']} lines ({r['config']['invalid_utf8']})"
        console.print(kv_table({k: esc(v) for k, v in rows.items()}))

    emit(result, as_json, render)


@app.command("encode")
def encode(
    tokenizer: str = typer.Argument(..., metavar="DIR", help="Tokenizer or model directory, or a tokenizer.model file."),
    text: str = typer.Argument(..., metavar="TEXT|-", help="Text to encode, or - to read stdin exactly (line breaks included)."),
    pieces: bool = typer.Option(False, "--pieces", help="Print the pieces instead of the ids."),
    bos: bool = typer.Option(False, "--bos", help="Start with <bos>."),
    eos: bool = typer.Option(False, "--eos", help="End with <eos>."),
    special: bool = typer.Option(False, "--special", help="Turn special tokens written in the text into their ids."),
    as_json: bool = JSON_OPTION,
):
    """Encode text to token ids (or pieces with --pieces)."""
    from tokenizer import Tokenizer, display_piece

    tok = Tokenizer.load(tokenizer)
    text = _read_arg(text, "text")
    ids = tok.encode(text, bos=bos, eos=eos, allow_special=special)
    shown = [tok.id_to_piece(i) for i in ids]
    result = {"ids": ids, "pieces": shown, "tokens": len(ids), "chars": len(text)}

    def render():
        if pieces:
            sys.stdout.write(" ".join(display_piece(p) for p in shown) + "\n")
        else:
            sys.stdout.write(" ".join(map(str, ids)) + "\n")

    emit(result, as_json, render)


def _parse_ids(value: str) -> list[int]:
    value = value.strip()
    if value.startswith("{"):  # the --json output of `lbdl tokenizer encode`
        try:
            return [int(i) for i in json.loads(value)["ids"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError("IDS looks like JSON but has no list of integers under 'ids'") from None
    items = value.strip("[]").replace(",", " ").split()
    try:
        return [int(i) for i in items]
    except ValueError:
        bad = next(i for i in items if not i.lstrip("-").isdigit())
        raise DataError(f"token id {bad!r} is not an integer; pass ids separated by spaces or commas") from None


@app.command("decode")
def decode(
    tokenizer: str = typer.Argument(..., metavar="DIR", help="Tokenizer or model directory, or a tokenizer.model file."),
    ids: str = typer.Argument(..., metavar="IDS|-", help="Token ids ('1 2 3', '1,2,3' or '[1, 2, 3]'), or - to read them from stdin."),
    skip_special: bool = typer.Option(False, "--skip-special", help="Drop user special tokens (they print as text otherwise)."),
    as_json: bool = JSON_OPTION,
):
    """Decode token ids to text (written exactly, with no added newline in a pipe)."""
    from tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    token_ids = _parse_ids(_read_arg(ids, "IDS"))
    text = tok.decode(token_ids, skip_special=skip_special)
    result = {"text": text, "tokens": len(token_ids), "chars": len(text)}

    def render():
        sys.stdout.write(text)
        if sys.stdout.isatty() and not text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()

    emit(result, as_json, render)


@app.command("inspect")
def inspect(
    tokenizer: str = typer.Argument(..., metavar="DIR", help="Tokenizer or model directory, or a tokenizer.model file."),
    text: str = typer.Option(None, "--text", help="Measure compression (and check the round trip) on this text file."),
    top: int = typer.Option(10, "--top", help="How many of the longest pieces to list."),
    invalid_utf8: str = typer.Option("error", "--invalid-utf8", help="With --text: error | replace | skip."),
    as_json: bool = JSON_OPTION,
):
    """Show a tokenizer: vocabulary, special tokens, longest pieces, training report, compression on --text."""
    from tokenizer import Tokenizer, display_piece
    from tokenizer.corpus import TextFile

    tok = Tokenizer.load(tokenizer)
    n = tok.vocab_size
    kinds = {"special": 0, "byte": 0, "line break": 0, "learned": 0}
    for i in range(n):
        if tok.is_special(i):
            kinds["special"] += 1
        elif tok.is_byte(i):
            kinds["byte"] += 1
        elif not tok.is_learned(i):
            kinds["line break"] += 1
        else:
            kinds["learned"] += 1
    result = {"path": str(tok.path), "tokenizer_sha256": tok.sha256, "vocab_size": n,
              "special_tokens": tok.special_tokens, "user_special_tokens": tok.user_special_tokens,
              "byte_fallback": tok.byte_fallback, "exact": tok.exact, "pieces": kinds, "longest_pieces": tok.longest_pieces(top),
              "training": tok.report}
    if text is not None:
        body = "".join(TextFile(text, invalid_utf8))
        ids = tok.encode(body)
        stats = tok.compression(body)
        stats.update({"file": text, "round_trip": tok.decode(ids) == body,
                      "byte_tokens": sum(1 for i in ids if tok.is_byte(i)),
                      "unknown_tokens": sum(1 for i in ids if i == tok.unk_id)})
        result["text"] = stats

    def render():
        console.print(f"[bold]{esc(tok.path)}[/bold]  sha256 {tok.sha256[:16]}")
        rows = {
            "vocabulary": f"{n:,} ({', '.join(f'{v:,} {k}' for k, v in kinds.items())})",
            "special tokens": " ".join(f"{k}={v}" for k, v in tok.special_tokens.items()),
            "byte fallback": "yes" if tok.byte_fallback else "no",
            "exact round trips": "yes" if tok.exact else "no (not trained with lbdl's settings: text may be normalised)",
            "longest pieces": "  ".join(repr(display_piece(p))[1:-1] for p in result["longest_pieces"]),
        }
        r = tok.report
        if r:
            c = r["compression"]
            rows["trained on"] = f"{len(r['files'])} file(s), {human_bytes(r['bytes'])}, {r['training_lines']:,} lines ({r['sampling']})"
            rows["training time"] = f"{r['seconds']:.1f} s (sentencepiece {r['sentencepiece_seconds']:.1f} s)"
            rows[f"compression ({c['text']})"] = f"{c['chars_per_token']:.2f} chars/token, {c['bytes_per_token']:.2f} bytes/token"
        if "text" in result:
            s = result["text"]
            rows[f"compression on {text}"] = (f"{s['chars_per_token']:.2f} chars/token, {s['bytes_per_token']:.2f} bytes/token "
                                              f"({s['tokens']:,} tokens for {s['chars']:,} chars)")
            rows["round trip"] = "exact" if s["round_trip"] else "NOT exact"
            rows["byte-fallback tokens"] = f"{s['byte_tokens']:,} ({s['byte_tokens'] / max(1, s['tokens']):.2%})"
        console.print(kv_table({k: esc(v) for k, v in rows.items()}))

    emit(result, as_json, render)
