"""`lbdl generate` as one library call: `GenerateConfig`, and `generate_text` from a model directory to a result.

    from lbdl_cli.sample.run import GenerateConfig, generate_text
    result = generate_text("run/best", "To be, or not", GenerateConfig(temperature=0, max_new_tokens=20))
    result["results"][0]["text"], result["decode_tokens_per_s"]
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

from ..config import adapter_setting, device_setting, dtype_setting, engine_setting, force_base_setting, setting
from ..errors import ConfigError
from ..progress import Progress, report
from .decode import generate, summarize
from .loading import describe, load_for_inference
from .processors import SamplingConfig
from .text import encode_prompt, unescape


def stop_strings(stops: tuple[str, ...]) -> tuple[str, ...]:
    """Stop strings as typed (`\\n` for a line break) as the text they stop at."""
    return tuple(unescape(s) for s in stops)


@dataclass(frozen=True)
class GenerateConfig(SamplingConfig):
    """`lbdl generate`: how to sample (SamplingConfig's fields, stop strings as typed) and what to run."""

    RENAMED = {"dtype": "compute_dtype"}

    num_samples: int = setting(1, "Samples per prompt.", low=1, high=1 << 12)
    each_line: bool = setting(False, "Every non-empty line of the prompt is a prompt of its own (one batch).")
    compute_dtype: str = dtype_setting()
    device: str = device_setting()
    engine: str = engine_setting()
    adapter: str | None = adapter_setting()
    force_base: bool = force_base_setting()

    @property
    def sampling(self) -> SamplingConfig:
        """The SamplingConfig for generate(), its stop strings unescaped."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingConfig)}
        return SamplingConfig(**{**values, "stop": stop_strings(self.stop)})


def split_prompts(text: str, each_line: bool = False) -> list[str]:
    """The prompts of a prompt text: the text, or each of its non-empty lines."""
    if not text:
        raise ConfigError("the prompt is empty; give some text for the model to continue")
    prompts = [line for line in text.splitlines() if line.strip()] if each_line else [text]
    if not prompts:
        raise ConfigError("the prompt has no non-empty line; give some text for the model to continue")
    return prompts


def generate_text(model_dir: str | os.PathLike | None, prompt: str, cfg: GenerateConfig | None = None,
                  on_text: Callable[[str], None] | None = None, progress: Progress | None = None) -> dict:
    """Continue `prompt` (each of its lines with cfg.each_line) with the model in `model_dir` (None: the bundled
    default). Every prompt is checked before anything is generated. When the run makes one sample, `on_text`
    receives the prompt and then the new text as it is decoded. A slid context window is reported to `progress`
    as a warning. Returns the settings, the totals of `summarize` and every Generation as a dict."""
    cfg = cfg or GenerateConfig()
    prompts = split_prompts(prompt, cfg.each_line)
    sampling = cfg.sampling
    model, tok, _ = load_for_inference(model_dir, cfg.compute_dtype, cfg.device, progress=progress,
                                       adapter=cfg.adapter, force_base=cfg.force_base,
                                       engine=cfg.engine)
    for i, p in enumerate(prompts):  # refuse a bad prompt before anything is written
        encode_prompt(tok, p, i if len(prompts) > 1 else None)
    stream = on_text is not None and len(prompts) * cfg.num_samples == 1
    if stream:
        on_text(prompts[0])
    results = generate(model, tok, prompts, sampling, num_samples=cfg.num_samples,
                       on_token=(lambda index, text: on_text(text)) if stream else None,
                       on_notice=lambda m: report(progress, "generate", message=m, level="warning"))
    return {"model": str(model_dir) if model_dir is not None else "default", **describe(model),
            "sampling": sampling.to_dict(),
            "num_samples": cfg.num_samples, **summarize(results), "results": [g.to_dict() for g in results]}
