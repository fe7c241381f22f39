"""Sampling: logits processors and `generate()` with a KV cache.

    from lbdl_cli.sample import SamplingConfig, generate, load_for_inference
    model, tok, _ = load_for_inference("run/best")
    [out] = generate(model, tok, "To be, or not", SamplingConfig(temperature=0.8, top_p=0.95, seed=1))
    print(out.text, out.decode_tokens_per_s)

`generate` runs one prefill of the prompt (the head only on its last
position), then one position per new token through a preallocated KV cache.
The logits processors run in this order, as Hugging Face's do: repetition
penalty, temperature, top-k, top-p, min-p; temperature 0 is greedy (argmax
after the penalty). Prompts of equal length share one batch (and one cache);
prompts of other lengths run as batches of their own, so nothing is padded.
When prompt plus output would pass the model's context, the window slides: the
oldest tokens are dropped and the cache is rebuilt from the newest half of the
context (llama.cpp's context shift), and `on_notice` is told once.

Library code never prints: text reaches the caller through `on_token(index,
text)` as it is decoded, and through the returned `Generation`s.

Speed on a CPU, where a small model's decoding is bound by reading its weights
once per token: q, k and v are one matrix multiply (model.py), the KV cache is
float32 and sized for the prompt plus max_new_tokens, and every product runs
through the kernel that is fastest for its rows, dtype and layout, chosen per
call (`lbdl_cli.kernels`; `load_for_inference` lays the matrices out for them).

`load_for_inference(..., engine="llama.cpp")` returns instead an `engine.LlamaCppModel`: the directory exported to
GGUF (once, into the user's cache) and run by llama.cpp through llama-cpp-python. It answers the same calls as
GPT, so `generate`, the processors, stop strings and perplexity are the same code for both engines.
"""

from .decode import Generation, NoticeCallback, generate, summarize
from .loading import load_for_inference
from .processors import (
    SamplingConfig,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_tokens,
)
from .run import GenerateConfig, generate_text
from .text import STREAM_CONTEXT, TextStream, TokenCallback, encode_prompt

__all__ = [
    "GenerateConfig", "Generation", "NoticeCallback", "STREAM_CONTEXT", "SamplingConfig", "TextStream",
    "TokenCallback", "apply_min_p", "apply_repetition_penalty", "apply_top_k", "apply_top_p", "encode_prompt",
    "generate", "generate_text", "load_for_inference", "next_tokens", "summarize",
]
