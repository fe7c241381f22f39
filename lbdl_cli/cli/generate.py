"""`lbdl generate`: continue a prompt with a model, the text streamed as it comes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..sample import SamplingConfig
from .output import DEVICE_OPTION, DTYPE_OPTION, JSON_OPTION, emit, err_console

DEFAULTS = SamplingConfig()
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def _unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line, as the characters."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in ESCAPES:
            out.append(ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _read_prompt(source: str, what: str) -> str:
    if source == "-":
        return sys.stdin.read()
    if what == "file":
        from ..evaluate import read_text

        return read_text(source)
    return source


def _model_and_prompt(args: list[str], prompt_file: str | None) -> tuple[str | None, str]:
    from ..errors import ConfigError

    if len(args) > 2:
        raise ConfigError(f"expected [MODEL] PROMPT but got {len(args)} arguments; quote a prompt that has spaces")
    if prompt_file is not None:
        if len(args) == 2:
            raise ConfigError("give the prompt either as an argument or with --prompt-file, not both")
        return (args[0] if args else None), _read_prompt(prompt_file, "file")
    if len(args) == 2:
        return args[0], _read_prompt(args[1], "arg")
    if len(args) == 1 and not (Path(args[0]) / "config.json").is_file():
        return None, _read_prompt(args[0], "arg")
    raise ConfigError("no prompt given: pass PROMPT (after the model), --prompt-file FILE, or - to read stdin")


def generate(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="[MODEL] PROMPT",
        help="Model directory (left out: the bundled default model), then the prompt; - reads it from stdin."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Read the prompt from this file (- = stdin)."),
    each_line: bool = typer.Option(False, "--each-line", help="Every non-empty line of the prompt is a prompt of its own (one batch)."),
    max_new_tokens: int = typer.Option(DEFAULTS.max_new_tokens, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(DEFAULTS.temperature, "--temperature", "-t", help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(DEFAULTS.top_k, "--top-k", help="Keep the k most likely tokens; 0 = off."),
    top_p: float = typer.Option(DEFAULTS.top_p, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this probability; 1 = off."),
    min_p: float = typer.Option(DEFAULTS.min_p, "--min-p", help="Keep tokens at least this fraction as likely as the top one; 0 = off."),
    repetition_penalty: float = typer.Option(DEFAULTS.repetition_penalty, "--repetition-penalty",
                                             help="> 1 discourages tokens already seen; 1 = off."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop at this text, left out of the output (repeatable; \\n is a line break)."),
    ignore_eos: bool = typer.Option(DEFAULTS.ignore_eos, "--ignore-eos", help="Keep generating after <eos>."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples per prompt."),
    seed: Optional[int] = typer.Option(DEFAULTS.seed, "--seed", help="Seed for reproducible sampling (default: fresh)."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Continue a prompt: `lbdl generate [MODEL] PROMPT`. The text streams to the terminal as it comes."""
    from ..errors import ConfigError
    from ..sample import resolve_device

    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                            stop=tuple(_unescape(s) for s in stop or ()), seed=seed, ignore_eos=ignore_eos)
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    model_arg, text = _model_and_prompt(list(args or []), prompt_file)
    if not text:
        raise ConfigError("the prompt is empty; give some text for the model to continue")
    prompts = [line for line in text.splitlines() if line.strip()] if each_line else [text]
    if not prompts:
        raise ConfigError("the prompt has no non-empty line; give some text for the model to continue")
    device = resolve_device(device)

    from ..sample import encode_prompt, generate as run_generate, load_for_inference, summarize

    model, tok, _ = load_for_inference(model_arg, dtype, device)
    for i, p in enumerate(prompts):  # refuse a bad prompt before anything is written
        encode_prompt(tok, p, i if len(prompts) > 1 else None)
    streaming = not as_json and len(prompts) * num_samples == 1
    out = sys.stdout

    def on_token(index: int, new_text: str):
        out.write(new_text)
        out.flush()

    if streaming:
        out.write(prompts[0])
        out.flush()
    results = run_generate(model, tok, prompts, config, num_samples=num_samples,
                           on_token=on_token if streaming else None,
                           on_notice=lambda m: err_console.print(f"[yellow]note:[/yellow] {m}", soft_wrap=True))
    totals = summarize(results)
    result = {"model": model_arg or "default", "device": str(device),
              "dtype": str(model.tok_emb.weight.dtype).replace("torch.", ""), "sampling": config.to_dict(),
              "num_samples": num_samples, **totals, "results": [g.to_dict() for g in results]}

    def render():
        if streaming:
            out.write("\n")
        else:
            for g in results:
                header = f"--- prompt {g.prompt_index + 1}" + (f", sample {g.sample_index + 1}" if num_samples > 1 else "")
                out.write(f"{header} ({g.finish_reason}) ---\n{g.prompt}{g.text}\n")
        out.flush()
        reasons = sorted({g.finish_reason for g in results})
        err_console.print(
            f"[dim]{totals['prompt_tokens']} prompt + {totals['new_tokens']} new tokens ({', '.join(reasons)}); "
            f"prefill {totals['prefill_tokens_per_s']:,.0f} tok/s, decode {totals['decode_tokens_per_s']:,.1f} tok/s "
            f"({result['device']}, {result['dtype']})[/dim]", soft_wrap=True)

    emit(result, as_json, render)
