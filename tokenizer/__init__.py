"""BPE tokenizers trained with sentencepiece, with exact round trips and special tokens.

    from tokenizer import train, Tokenizer, file_hash
    tok = train(["data/tinyshakespeare.txt"], vocab_size=4096, out="tok")
    tok = Tokenizer.load("tok")             # a directory or its tokenizer.model
    ids = tok.encode("To be, or not to be", bos=True)
    assert tok.decode(ids) == "To be, or not to be"

Names are loaded on first use, so `from tokenizer.config import TokenizerConfig`
does not import sentencepiece.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Tokenizer": "core", "file_hash": "core", "model_path": "core", "display_piece": "core",
    "TOKENIZER_FILE": "config", "CONFIG_FILE": "config",
    "train": "trainer", "sentencepiece_options": "trainer",
    "TokenizerConfig": "config", "EncodeConfig": "config", "DecodeConfig": "config", "InspectConfig": "config",
    "encode_text": "commands", "decode_ids": "commands", "inspect_tokenizer": "commands",
    "expand_files": "corpus", "TextFile": "corpus",
    "tokenizer_json": "hf", "save_hf_tokenizer": "hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
