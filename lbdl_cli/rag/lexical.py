"""Lexical retrieval: Okapi BM25 over the chunks, through `bm25s`.

    lex = Lexical.build(["the cat sat", "a dog ran"], tokens="words")
    lex.save(index_dir / "bm25")                  # .npy arrays (no pickle) and JSON, bm25s's own format
    Lexical.load(index_dir / "bm25").scores("cat") # (N,) float32, one score per chunk

The score is the textbook one (Robertson et al., k1 = 1.5, b = 0.75):
    sum over query terms t of idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avglen)),
    idf(t) = ln((N - df + 0.5) / (df + 0.5)), floored at 0 (a term in more than half the chunks counts nothing).
bm25s's "robertson" method computes it without the constant factor (k1 + 1), which `scores` puts back, so
the numbers are rank_bm25's BM25Okapi wherever its own floor (epsilon times the mean idf, for the same
terms) does not apply. Terms are the lower-cased words (`\\w+`) of a text, or the tokenizer's pieces.

Torch-free, layer 7.
"""

from __future__ import annotations

import os
import re

from ..errors import DataError

TOKENS = ("words", "pieces")
K1, B = 1.5, 0.75
WORD_RE = re.compile(r"\w+")
METHOD = "robertson"


def terms(text: str, tokens: str = "words", tok=None) -> list[str]:
    """The terms of a text: its lower-cased words, or the tokenizer's pieces (whitespace-only pieces left out)."""
    if tokens == "words":
        return WORD_RE.findall(text.lower())
    if tok is None:
        raise ValueError("pieces need the index's tokenizer")
    return [p for p in tok.pieces(text) if p.replace("\u2581", "").strip()]


class Lexical:
    """A BM25 index over the chunks, in chunk order."""

    def __init__(self, bm25, tokens: str):
        self.bm25 = bm25
        self.tokens = tokens

    @classmethod
    def build(cls, texts: list[str], tokens: str = "words", tok=None) -> Lexical:
        import bm25s

        bm25 = bm25s.BM25(k1=K1, b=B, method=METHOD)
        corpus = [terms(t, tokens, tok) for t in texts]
        if not any(corpus):
            corpus[0] = [""]  # no terms anywhere: bm25s needs a vocabulary; every score is 0
        bm25.index(corpus, show_progress=False)
        return cls(bm25, tokens)

    def save(self, dir: str | os.PathLike) -> None:
        """bm25s's own files: data/indices/indptr .npy arrays (saved without pickle) and two JSON files."""
        self.bm25.save(str(dir), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, dir: str | os.PathLike, tokens: str) -> Lexical:
        """The index `save` wrote (its arrays read with allow_pickle=False); `tokens` as index.json records."""
        import bm25s

        try:
            bm25 = bm25s.BM25.load(str(dir), allow_pickle=False, mmap=False, load_corpus=False,
                                   show_progress=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{dir} is not a readable BM25 index ({e}); rebuild the index with --force") from None
        return cls(bm25, tokens)

    def scores(self, query: str, tok=None):
        """(N,) float32 BM25 scores of every chunk for `query`; zeros when no term of it is in the index."""
        import numpy as np

        ids = self.bm25.get_tokens_ids(terms(query, self.tokens, tok))
        if not ids:
            return np.zeros(self.bm25.scores["num_docs"], dtype=np.float32)
        return self.bm25.get_scores_from_ids(ids).astype(np.float32) * (K1 + 1)

