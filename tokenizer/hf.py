"""A Hugging Face `tokenizer.json` (the `tokenizers` format) that encodes and decodes exactly as lbdl does.

Written as plain JSON: the `tokenizers` library is not needed to write it. What
transformers' `SpmConverter` does for a sentencepiece BPE model, for lbdl's settings:

- the model is BPE over characters with byte fallback: the vocabulary is the
  sentencepiece pieces at their ids, the merges every split of a learned piece
  into two pieces that can be symbols, ranked by the piece's score (the order
  sentencepiece merges in);
- no normalizer, no pre-tokenizer: lbdl keeps the text as written (no dummy
  prefix, no whitespace folding). sentencepiece writes a space as U+2581, so
  the pieces are written with real spaces instead; a literal U+2581 in the
  text is then in no piece and falls back to its three bytes, as lbdl spells
  it — no `Replace` step that would turn it into a space;
- the decoder turns byte pieces back into bytes and joins the pieces;
- <unk>/<bos>/<eos>/<pad> and the user special tokens are added special
  tokens (like lbdl's `allow_special=True`; transformers' `split_special_tokens=True`
  reads them as text, like lbdl's default); the line breaks, which lbdl
  makes user-defined symbols, are added tokens that are not special.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lbdl_cli.errors import DataError

from .config import BOS, EOS, PAD, UNK
from .core import SPACE_MARK, Tokenizer

TOKENIZER_JSON = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
HF_FILES = (TOKENIZER_JSON, HF_CONFIG_FILE, SPECIAL_TOKENS_MAP)


def _text(piece: str) -> str:
    """A piece as the text it stands for: sentencepiece's space mark is a space."""
    return piece.replace(SPACE_MARK, " ")


def _kinds(tok: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(special ids, user-defined ids, learned ids): <unk> and control symbols; the pieces sentencepiece
    matches whole before merging (lbdl's line breaks, placed before the byte pieces); the rest."""
    sp = tok._sp
    first_byte = min(tok._byte_ids.values())
    special, user, learned = [], [], []
    for i in range(tok.vocab_size):
        if sp.is_unknown(i) or sp.is_control(i):
            special.append(i)
        elif sp.is_byte(i) or sp.is_unused(i):
            continue
        elif i < first_byte:
            user.append(i)
        else:
            learned.append(i)
    return special, user, learned


def _merges(tok: Tokenizer, learned: list[int]) -> list[list[str]]:
    """Every (left, right) whose concatenation is a learned piece, both halves learned pieces, ranked as
    sentencepiece merges: the piece of higher score first (then of lower id), then by the left half's id."""
    sp = tok._sp
    ids = {tok._pieces[i]: i for i in learned}
    ranked = []
    for i in learned:
        piece = tok._pieces[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-sp.get_score(i), i, ids[left], ids[right], left, right))
    ranked.sort()
    return [[_text(left), _text(right)] for *_, left, right in ranked]


def _added(id: int, content: str, special: bool) -> dict:
    return {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def tokenizer_json(tok: Tokenizer) -> dict:
    """The `tokenizer.json` of `tok` as a dict (Hugging Face `tokenizers` format)."""
    if not tok.exact:
        raise DataError(f"{tok.path or 'the tokenizer'} was not trained with lbdl's settings (byte fallback, "
                        f"identity normalisation, spaces kept, no dummy prefix); it has no exact Hugging Face "
                        f"form")
    special, user, learned = _kinds(tok)
    pieces = tok._pieces
    vocab = {_text(p): i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):  # a piece holding a real space (never in a sentencepiece model)
        raise DataError(f"{tok.path or 'the tokenizer'} has pieces that differ only in spaces; it has no exact "
                        f"Hugging Face form")
    added = [_added(i, pieces[i], True) for i in special] + [_added(i, pieces[i], False) for i in user]
    added.sort(key=lambda a: a["id"])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": pieces[tok.unk_id], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": _merges(tok, learned),
        },
    }


def special_tokens_map(tok: Tokenizer) -> dict:
    """bos/eos/unk/pad tokens (those the tokenizer has) and the user special tokens."""
    out = {}
    for key, name, i in (("bos_token", BOS, tok.bos_id), ("eos_token", EOS, tok.eos_id),
                         ("unk_token", UNK, tok.unk_id), ("pad_token", PAD, tok.pad_id)):
        if i >= 0:
            out[key] = tok.id_to_piece(i)
    if tok.user_special_tokens:
        out["additional_special_tokens"] = list(tok.user_special_tokens)
    return out


def tokenizer_config(tok: Tokenizer, model_max_length: int | None = None) -> dict:
    """transformers' `tokenizer_config.json`: the fast tokenizer of `tokenizer.json`, adding no <bos>/<eos>
    (lbdl adds them only when asked), cleaning up no spaces (the text comes back as it was)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map(tok),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def save_hf_tokenizer(tok: Tokenizer, out: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into the existing
    directory `out` (callers write the whole directory atomically); the names written."""
    out = Path(out)
    files = {TOKENIZER_JSON: tokenizer_json(tok), HF_CONFIG_FILE: tokenizer_config(tok, model_max_length),
             SPECIAL_TOKENS_MAP: special_tokens_map(tok)}
    for name, value in files.items():
        (out / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return list(files)
