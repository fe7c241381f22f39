"""One call per `lbdl tokenizer encode|decode|inspect`: a tokenizer file or directory in, a result dict out.

    from tokenizer.commands import encode_text, inspect_tokenizer
    encode_text("tok", "To be", EncodeConfig(bos=True))["ids"]
    inspect_tokenizer("tok", "val.txt")["text"]["round_trip"]
"""

from __future__ import annotations

import os

from .config import DecodeConfig, EncodeConfig, InspectConfig
from .core import Tokenizer
from .corpus import TextFile


def encode_text(tokenizer: str | os.PathLike, text: str, cfg: EncodeConfig | None = None) -> dict:
    """{ids, pieces, tokens, chars} of `text`."""
    cfg = cfg or EncodeConfig()
    tok = Tokenizer.load(tokenizer)
    ids = tok.encode(text, bos=cfg.bos, eos=cfg.eos, allow_special=cfg.special)
    return {"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids], "tokens": len(ids), "chars": len(text)}


def decode_ids(tokenizer: str | os.PathLike, ids: list[int], cfg: DecodeConfig | None = None) -> dict:
    """{text, tokens, chars} of token ids."""
    cfg = cfg or DecodeConfig()
    text = Tokenizer.load(tokenizer).decode(ids, skip_special=cfg.skip_special)
    return {"text": text, "tokens": len(ids), "chars": len(text)}


def inspect_tokenizer(tokenizer: str | os.PathLike, text: str | os.PathLike | None = None,
                      cfg: InspectConfig | None = None) -> dict:
    """A tokenizer's vocabulary (pieces by kind), special tokens, longest pieces and training report; with
    `text` (a UTF-8 file, read with cfg.invalid_utf8), its compression and round trip on that text."""
    cfg = cfg or InspectConfig()
    tok = Tokenizer.load(tokenizer)
    kinds = {"special": 0, "byte": 0, "line break": 0, "learned": 0}
    for i in range(tok.vocab_size):
        if tok.is_special(i):
            kinds["special"] += 1
        elif tok.is_byte(i):
            kinds["byte"] += 1
        elif not tok.is_learned(i):
            kinds["line break"] += 1
        else:
            kinds["learned"] += 1
    result = {"path": str(tok.path), "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
              "special_tokens": tok.special_tokens, "user_special_tokens": tok.user_special_tokens,
              "byte_fallback": tok.byte_fallback, "exact": tok.exact, "pieces": kinds,
              "longest_pieces": tok.longest_pieces(cfg.top), "training": tok.report}
    if text is not None:
        body = "".join(TextFile(text, cfg.invalid_utf8))
        ids = tok.encode(body)
        stats = tok.compression(body)
        stats.update({"file": str(text), "round_trip": tok.decode(ids) == body,
                      "byte_tokens": sum(1 for i in ids if tok.is_byte(i)),
                      "unknown_tokens": sum(1 for i in ids if i == tok.unk_id)})
        result["text"] = stats
    return result
