"""`lbdl generate`: continue a prompt with a model, the text streamed as it comes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..checkpoint.configs import CONFIG_FILE
from ..sample.run import GenerateConfig
from .options import build, config_options
from .output import JSON_OPTION, emit, err_console, progress_view


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def _read_prompt(source: str, is_file: bool) -> str:
    if source == "-":
        return sys.stdin.read()
    if is_file:
        from ..files import read_text

        return read_text(source, "prompt file")
    return source


def _model_and_prompt(args: list[str], prompt_file: str | None) -> tuple[str | None, str]:
    """Which argument is the model and which the prompt; the prompt's text."""
    from ..errors import ConfigError

    if len(args) > 2:
        raise ConfigError(f"expected [MODEL] PROMPT but got {len(args)} arguments; quote a prompt that has spaces")
    if prompt_file is not None:
        if len(args) == 2:
            raise ConfigError("give the prompt either as an argument or with --prompt-file, not both")
        return (args[0] if args else None), _read_prompt(prompt_file, True)
    if len(args) == 2:
        return args[0], _read_prompt(args[1], False)
    if len(args) == 1 and not (Path(args[0]) / CONFIG_FILE).is_file():
        return None, _read_prompt(args[0], False)
    raise ConfigError("no prompt given: pass PROMPT (after the model), --prompt-file FILE, or - to read stdin")


@config_options(GenerateConfig)
def generate(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="[MODEL] PROMPT",
        help="Model directory (left out: the bundled default model), then the prompt; - reads it from stdin."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file",
                                              help="Read the prompt from this file (- = stdin)."),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Continue a prompt: `lbdl generate [MODEL] PROMPT`. The text streams to the terminal as it comes."""
    from ..sample.run import generate_text

    cfg = build(GenerateConfig, fields)
    model_arg, text = _model_and_prompt(list(args or []), prompt_file)
    out = sys.stdout

    def on_text(new_text: str):
        out.write(new_text)
        out.flush()

    with progress_view(quiet=True) as listen:  # no bars: stdout is the stream; warnings still reach stderr
        result = generate_text(model_arg, text, cfg, on_text=None if as_json else on_text, progress=listen)
    results = result["results"]

    def render():
        if len(results) == 1:  # streamed: the prompt and its continuation are out already
            out.write("\n")
        else:
            for g in results:
                header = f"--- prompt {g['prompt_index'] + 1}" + (
                    f", sample {g['sample_index'] + 1}" if result["num_samples"] > 1 else "")
                out.write(f"{header} ({g['finish_reason']}) ---\n{g['prompt']}{g['text']}\n")
        out.flush()
        reasons = sorted({g["finish_reason"] for g in results})
        err_console.print(
            f"[dim]{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens ({', '.join(reasons)}); "
            f"prefill {result['prefill_tokens_per_s']:,.0f} tok/s, decode {result['decode_tokens_per_s']:,.1f} tok/s "
            f"({result['device']}, {result['dtype']})[/dim]", soft_wrap=True)

    emit(result, as_json, render)
