"""Retrieval-augmented prompts and answers (LBDL 8.1): the retrieved chunks before the question, cited as [n].

    from lbdl_cli.rag.assemble import RagConfig, rag_generation
    result = rag_generation("run/best", "How do I merge adapters?", "docs.rag", RagConfig(k=4), PromptConfig(),
                            ChainConfig(), GenerateConfig(temperature=0, max_new_tokens=64))
    result["answer"], result["sources"]        # ["[1] docs/lora.md:12-30", ...]

The prompt is the instruction, the sources (each `[n] path:first-last` and its text, best first), then the
prompt that prompting.build_prompt makes of the question (its own instruction, shots, format):

    Answer the question using the sources below; cite them as [1], [2].

    [1] docs/lora.md:12-30
    ...

    Q: How do I merge adapters? A:

It fits the model's context with max_new_tokens left: the sources come first, so the shots are dropped before
any source; then the lowest-ranked sources are dropped, one at a time. A question that does not fit even alone
is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from ..config import Config, setting
from ..errors import ConfigError
from ..prompting import ChainConfig, PromptConfig, build_prompt, check_chains, load_shots, sample_chains
from .retrieve import MODES, default_mode, index_embedder, search

DEFAULT_INSTRUCTION = "Answer the question using the sources below; cite them as [1], [2]."


@dataclass(frozen=True)
class RagConfig(Config):
    """What is retrieved for a question and how it is put before it."""

    k: int = setting(4, "Chunks to retrieve.", low=1, high=1 << 10)
    mode: str | None = setting(None, "Retrieval: bm25, dense or hybrid (default: hybrid when the index has "
                                     "embeddings, else bm25).", choices=MODES)
    bm25_weight: float = setting(1.0, "Hybrid: the weight of the BM25 ranking in the fusion.", low=0.0, high=1e6)
    dense_weight: float = setting(1.0, "Hybrid: the weight of the dense ranking in the fusion.", low=0.0, high=1e6)
    rrf_k: int = setting(60, "Hybrid: reciprocal-rank fusion's constant (score = weight / (rrf_k + rank)).", low=1,
                         high=1 << 20)
    sources_instruction: str = setting(DEFAULT_INSTRUCTION, "What the prompt says before the sources.",
                                       metavar="TEXT")

    @property
    def weights(self) -> tuple[float, float]:
        return self.bm25_weight, self.dense_weight


@dataclass(frozen=True)
class RagPrompt:
    """An assembled prompt: its text, the sources in it (best first), the sources and shots dropped to fit."""

    text: str
    sources: list[dict]
    sources_dropped: int
    shots_used: int
    shots_dropped: int
    tokens: int


def where(hit: dict) -> str:
    return f"{hit['path']}:{hit['first_line']}-{hit['last_line']}"


def sources_block(hits: Sequence[dict], instruction: str) -> str:
    """The instruction and the sources, each `[n] path:first-last` and its text, ending in a blank line."""
    if not hits:
        return ""
    parts = [instruction.strip()] if instruction.strip() else []
    parts += [f"[{n}] {where(h)}\n{h['text'].strip()}" for n, h in enumerate(hits, 1)]
    return "\n\n".join(parts) + "\n\n"


def build_rag_prompt(question: str, hits: Sequence[dict], tok, context: int, max_new_tokens: int,
                     rag: RagConfig | None = None, prompt: PromptConfig | None = None, shots=None) -> RagPrompt:
    """The prompt of `question` with as many of `hits` (best first) as fit in context - max_new_tokens, the few-shot
    prompt of prompting.build_prompt after them; shots are dropped before sources, the lowest-ranked source first."""
    rag, prompt = rag or RagConfig(), prompt or PromptConfig()
    budget = context - max_new_tokens
    for n in range(len(hits), 0, -1):
        head = sources_block(hits[:n], rag.sources_instruction)
        room = budget - len(tok.encode(head, allow_special=True))
        if room < 1:
            continue
        try:
            built = build_prompt(question, prompt, shots, tok, context=room, max_new_tokens=0)
        except ConfigError:
            continue  # this many sources leave no room for the question
        text = head + built.text
        tokens = len(tok.encode(text, allow_special=True))
        if tokens <= budget:
            return RagPrompt(text, list(hits[:n]), len(hits) - n, built.shots_used, built.shots_dropped, tokens)
    try:
        built = build_prompt(question, prompt, shots, tok, context=context, max_new_tokens=max_new_tokens)
    except ConfigError as e:
        if "without shots" not in str(e):
            raise
        n = len(tok.encode(build_prompt(question, prompt, [], tok).text, allow_special=True))
        raise ConfigError(f"the question is {n} tokens; the model's context of {context} leaves {budget} after "
                          f"{max_new_tokens} new tokens; shorten the question or lower --max-new-tokens") from None
    return RagPrompt(built.text, [], len(hits), built.shots_used, built.shots_dropped, built.tokens)


def rag_generation(model_dir, question: str, index_dir: str | os.PathLike, rag: RagConfig, prompt: PromptConfig,
                   chains: ChainConfig, gen, embed_model: str | os.PathLike | None = None, on_text=None,
                   progress=None) -> dict:
    """`question` answered by the model in `model_dir` (None: the bundled one) from the `rag.k` chunks of the index
    that retrieval ranks best (dense retrieval embeds with `embed_model`, default the index's own model), as
    prompting.prompted_generation does with a built prompt: `chains.self_consistency` chains, each one's answer
    read, the majority taken. Returns the prompt, the hits, the sources in the prompt (`[n] path:first-last`),
    how many sources and shots were dropped, the chains, their answers, the answer and the votes."""
    from ..progress import report
    from ..sample import load_for_inference
    from .index import Index

    check_chains(chains, gen.sampling)
    shots = load_shots(prompt.shots) if prompt.shots else None
    index = Index(index_dir)
    mode = rag.mode or default_mode(index)
    embedder = None
    if mode != "bm25":
        embedder = index_embedder(index, embed_model, gen.compute_dtype, gen.device, progress)
    hits = search(index, question, rag.k, mode, embedder, rag.weights, rag.rrf_k)
    model, tok, _ = load_for_inference(model_dir, gen.compute_dtype, gen.device, progress=progress,
                                       adapter=gen.adapter, force_base=gen.force_base,
                                       engine=gen.engine)
    built = build_rag_prompt(question, hits, tok, model.config.block_size, gen.sampling.max_new_tokens, rag,
                             prompt, shots)
    if built.sources_dropped:
        report(progress, "rag", message=f"{built.sources_dropped} of {len(hits)} sources dropped to fit the "
                                        f"context of {model.config.block_size}", level="warning")
    return {"model": str(model_dir) if model_dir is not None else "default", "index": str(index_dir), "mode": mode,
            "question": question, "hits": hits, "prompt": built.text,
            "sources": [f"[{n}] {where(h)}" for n, h in enumerate(built.sources, 1)],
            "sources_used": len(built.sources), "sources_dropped": built.sources_dropped,
            "shots_used": built.shots_used, "shots_dropped": built.shots_dropped, "prompt_tokens": built.tokens,
            **sample_chains(model, tok, built.text, gen.sampling, chains, on_text, progress)}
