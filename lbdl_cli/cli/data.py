"""`lbdl data prepare|info`: text corpora -> memory-mappable token shards."""

from __future__ import annotations

import typer

from ..data import PrepareConfig
from .options import build, config_options, group, out_option
from .output import FORCE_OPTION, JSON_OPTION, console, emit, esc, human_bytes, human_count, kv_table, progress_view

app = group("Prepare corpora: tokenize text into train/val token shards.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")


def _rows(meta: dict) -> dict:
    """The shard directory as table rows; what a hand-written meta.json leaves out (only the token counts, dtype,
    vocabulary and tokenizer hash are required) is left out of the table too."""
    rows = {}
    for split in ("train", "val"):
        tokens, docs, nbytes = meta[f"{split}_tokens"], meta.get(f"{split}_documents"), meta.get(f"{split}_bytes")
        row = f"{tokens:,} tokens ({human_count(tokens)})"
        if docs is not None:
            row += f", {docs:,} documents"
        if nbytes is not None:
            row += f", {human_bytes(nbytes)} of text, {nbytes / max(1, tokens):.2f} bytes/token"
        rows[f"{split}.bin"] = row
    rows["dtype"] = f"{meta['dtype']} (vocabulary {meta['vocab_size']:,})"
    if all(k in meta for k in ("split_on", "val_fraction", "seed")):
        rows["split"] = (f"{meta['split_on']} documents, val fraction {meta['val_fraction']}, seed {meta['seed']}; "
                         f"<eos> after each document")
    rows["tokenizer sha256"] = meta["tokenizer_sha256"][:16]
    sources = meta.get("sources") or []
    if sources:
        rows["sources"] = ", ".join(f"{s.get('path')} ({human_bytes(s.get('bytes', 0))}, sha256 "
                                    f"{str(s.get('sha256', ''))[:12]})" for s in sources[:5]) + (
            f" and {len(sources) - 5} more" if len(sources) > 5 else "")
    if meta.get("invalid_utf8_lines"):
        rows["invalid UTF-8"] = f"{meta['invalid_utf8_lines']} lines ({meta['invalid_utf8']})"
    return rows


@app.command("prepare")
@config_options(PrepareConfig)
def prepare(
    files: list[str] = typer.Argument(..., metavar="FILES", help="Text files or globs (quote globs; `**` recurses)."),
    tokenizer: str = typer.Option(..., "--tokenizer", metavar="TOKENIZER",
                                  help="Tokenizer or model directory, or a tokenizer.model file."),
    out: str = out_option("Output shard directory (train.bin, val.bin, meta.json)."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Tokenize text into train.bin / val.bin token arrays plus meta.json, split on document boundaries."""
    from ..data import prepare as prepare_data

    cfg = build(PrepareConfig, fields)
    with progress_view(quiet=as_json) as listen:
        result = prepare_data(files, tokenizer, out, config=cfg, force=force, progress=listen)

    def render():
        total = result["train_tokens"] + result["val_tokens"]
        console.print(f"wrote {esc(result['out'])}: {total:,} tokens in {result['seconds']:.1f} s "
                      f"({total / max(result['seconds'], 1e-9) / 1e6:.2f}M tokens/s)")
        console.print(kv_table({k: esc(v) for k, v in _rows(result).items()}))

    emit(result, as_json, render)


@app.command("info")
def info(
    shards: str = typer.Argument(..., metavar="DIR", help="Shard directory written by `lbdl data prepare`."),
    as_json: bool = JSON_OPTION,
):
    """Show a shard directory's token counts, dtype, split and sources."""
    from ..data import info as shard_info

    result = shard_info(shards)

    def render():
        console.print(f"[bold]{esc(shards)}[/bold]  (format_version {result['format_version']})")
        console.print(kv_table({k: esc(v) for k, v in _rows(result).items()}))

    emit(result, as_json, render)
