"""`lbdl tokenizer train|encode|decode|inspect`: BPE tokenizers (the `tokenizer` package)."""

from __future__ import annotations

import json
import re
import sys
from typing import Optional

import typer

from tokenizer.config import DecodeConfig, EncodeConfig, InspectConfig, TokenizerConfig

from ..errors import DataError
from .options import build, config_options, file_option, group, out_option
from .output import FORCE_OPTION, JSON_OPTION, console, emit, esc, human_bytes, kv_table, progress_view

app = group("Train and use BPE tokenizers (sentencepiece, exact round trips).")
TOKENIZER_ARG = typer.Argument(..., metavar="TOKENIZER",
                               help="Tokenizer or model directory, or a tokenizer.model file.")


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


@app.command("train")
@config_options(TokenizerConfig)
def train(
    files: list[str] = typer.Argument(..., metavar="FILES", help="Text files or globs (quote globs; `**` recurses)."),
    out: str = out_option("Output tokenizer directory."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Train a byte-fallback BPE tokenizer; writes DIR/tokenizer.model (+ tokenizer_config.json)."""
    from tokenizer import train as train_tokenizer

    if fields.get("special_tokens"):  # comma-separated or repeated
        fields["special_tokens"] = [t.strip() for item in fields["special_tokens"] for t in item.split(",")
                                    if t.strip()]
    cfg = build(TokenizerConfig, fields)
    with progress_view(quiet=as_json) as listen:
        tok = train_tokenizer(files, config=cfg, out=out, force=force, progress=listen)
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
            f"compression ({c['text']})": f"{c['chars_per_token']:.2f} chars/token, "
                                          f"{c['bytes_per_token']:.2f} bytes/token "
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
@config_options(EncodeConfig)
def encode(
    tokenizer: str = TOKENIZER_ARG,
    text: str = typer.Argument(..., metavar="TEXT|-",
                               help="Text to encode, or - to read stdin exactly (line breaks included)."),
    pieces: bool = typer.Option(False, "--pieces", help="Print the pieces instead of the ids."),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Encode text to token ids (or pieces with --pieces)."""
    from tokenizer import display_piece, encode_text

    cfg = build(EncodeConfig, fields)
    result = encode_text(tokenizer, _read_arg(text, "text"), cfg)

    def render():
        shown = [display_piece(p) for p in result["pieces"]] if pieces else map(str, result["ids"])
        sys.stdout.write(" ".join(shown) + "\n")

    emit(result, as_json, render)


def _parse_ids(value: str) -> list[int]:
    """Token ids as '1 2 3', '1,2,3', a JSON list '[1, 2, 3]', or the --json output of `lbdl tokenizer encode`."""
    value = value.strip()
    if value.startswith(("[", "{")):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}" if "\n" in value else f"column {e.colno}"
            raise DataError(f"IDS is not valid JSON ({where}: {e.msg}); pass ids as '1 2 3', '1,2,3' or "
                            f"'[1, 2, 3]'") from None
        ids = data.get("ids") if isinstance(data, dict) else data
        if not isinstance(ids, list):
            raise DataError("IDS is JSON but not a list of token ids, nor an object with one under 'ids' "
                            "(the --json output of `lbdl tokenizer encode`)")
        bad = next((k for k, i in enumerate(ids) if type(i) is not int), None)  # true and 1.0 are not ids
        if bad is not None:
            raise DataError(f"token id {json.dumps(ids[bad])} (item {bad + 1} of IDS) is not an integer; "
                            f"pass a list of integers")
        return ids
    items = value.replace(",", " ").split()
    bad = next((i for i in items if not re.fullmatch(r"[-+]?[0-9]+", i)), None)
    if bad is not None:
        raise DataError(f"token id {bad!r} is not an integer; pass ids separated by spaces or commas")
    return [int(i) for i in items]


@app.command("decode")
@config_options(DecodeConfig)
def decode(
    tokenizer: str = TOKENIZER_ARG,
    ids: str = typer.Argument(..., metavar="IDS|-",
                              help="Token ids ('1 2 3', '1,2,3' or '[1, 2, 3]'), or - to read them from stdin."),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Decode token ids to text (written exactly, with no added newline in a pipe)."""
    from tokenizer import decode_ids

    cfg = build(DecodeConfig, fields)
    result = decode_ids(tokenizer, _parse_ids(_read_arg(ids, "IDS")), cfg)

    def render():
        text = result["text"]
        sys.stdout.write(text)
        if sys.stdout.isatty() and not text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()

    emit(result, as_json, render)


@app.command("inspect")
@config_options(InspectConfig)
def inspect(
    tokenizer: str = TOKENIZER_ARG,
    text: Optional[str] = file_option("--text", "Measure compression (and check the round trip) on this text file.",
                                      "text file"),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Show a tokenizer: vocabulary, special tokens, longest pieces, training report, compression on --text."""
    from tokenizer import display_piece, inspect_tokenizer

    cfg = build(InspectConfig, fields)
    result = inspect_tokenizer(tokenizer, text, cfg)

    def render():
        kinds = result["pieces"]
        console.print(f"[bold]{esc(result['path'])}[/bold]  sha256 {result['tokenizer_sha256'][:16]}")
        rows = {
            "vocabulary": f"{result['vocab_size']:,} ({', '.join(f'{v:,} {k}' for k, v in kinds.items())})",
            "special tokens": " ".join(f"{k}={v}" for k, v in result["special_tokens"].items()),
            "byte fallback": "yes" if result["byte_fallback"] else "no",
            "exact round trips": "yes" if result["exact"] else "no (not trained with lbdl's settings: text may be "
                                                               "normalised)",
            "longest pieces": "  ".join(repr(display_piece(p))[1:-1] for p in result["longest_pieces"]),
        }
        r = result["training"]
        if r:
            c = r["compression"]
            rows["trained on"] = (f"{len(r['files'])} file(s), {human_bytes(r['bytes'])}, "
                                  f"{r['training_lines']:,} lines ({r['sampling']})")
            rows["training time"] = f"{r['seconds']:.1f} s (sentencepiece {r['sentencepiece_seconds']:.1f} s)"
            rows[f"compression ({c['text']})"] = (f"{c['chars_per_token']:.2f} chars/token, "
                                                  f"{c['bytes_per_token']:.2f} bytes/token")
        if "text" in result:
            s = result["text"]
            rows[f"compression on {text}"] = (f"{s['chars_per_token']:.2f} chars/token, {s['bytes_per_token']:.2f} "
                                              f"bytes/token ({s['tokens']:,} tokens for {s['chars']:,} chars)")
            rows["round trip"] = "exact" if s["round_trip"] else "NOT exact"
            rows["byte-fallback tokens"] = f"{s['byte_tokens']:,} ({s['byte_tokens'] / max(1, s['tokens']):.2%})"
        console.print(kv_table({k: esc(v) for k, v in rows.items()}))

    emit(result, as_json, render)
