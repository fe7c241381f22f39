"""`lbdl generate`: continue a prompt with a model, the text streamed as it comes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ..checkpoint.configs import CONFIG_FILE
from ..errors import ConfigError
from ..prompting import ChainConfig, PromptConfig
from ..rag.assemble import RagConfig
from ..sample.run import GenerateConfig
from .options import build, complete_model_dirs, config_options, optional
from .output import JSON_OPTION, console, emit, err_console, progress_view, runs_on


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def _read_prompt(source: str, is_file: bool) -> str:
    if source == "-":
        return sys.stdin.read()
    if is_file:
        from ..files import read_text

        return read_text(source, "prompt file")
    return source


def _looks_like_path(arg: str) -> bool:
    """A path separator, or the name of something that exists: meant as a model, not as a prompt."""
    return (os.sep in arg or "/" in arg) and "\n" not in arg or os.path.lexists(arg)


def _model_and_prompt(args: list[str], prompt_file: str | None, model: str | None) -> tuple[str | None, str]:
    """Which argument is the model and which the prompt; the prompt's text. A lone argument is the prompt (and
    the bundled model runs) only when it cannot be a mistyped model path; --model says which model outright."""
    from ..checkpoint.configs import read_config

    def checked(path: str | None) -> str | None:
        if path is None or path == "default":
            return None
        read_config(path)  # a missing or broken model directory is an error naming it, before torch loads
        return path

    wanted = 2 if model is None else 1  # arguments at most: [MODEL] PROMPT, or PROMPT with --model
    if len(args) > wanted:
        usage = "[MODEL] PROMPT" if model is None else "PROMPT (the model is --model's)"
        raise ConfigError(f"expected {usage} but got {len(args)} arguments; quote a prompt that has spaces")
    if prompt_file is not None:
        if len(args) == wanted:
            raise ConfigError("give the prompt either as an argument or with --prompt-file, not both")
        return checked(model if model is not None else (args[0] if args else None)), _read_prompt(prompt_file, True)
    if not args:
        raise ConfigError("no prompt given: pass PROMPT (after the model), --prompt-file FILE, or - to read stdin")
    if model is not None:
        return checked(model), _read_prompt(args[0], False)
    if len(args) == 2:
        return checked(args[0]), _read_prompt(args[1], False)
    if (Path(args[0]) / CONFIG_FILE).is_file():
        raise ConfigError(f"no prompt given for the model {args[0]}: pass PROMPT after it, --prompt-file FILE, "
                          f"or - to read stdin")
    if _looks_like_path(args[0]) and args[0] != "-":
        raise ConfigError(f"{args[0]} looks like a path but is not a model directory (no {CONFIG_FILE}); fix the "
                          f"path, or pass --model default to send it as a prompt to the bundled model")
    return None, _read_prompt(args[0], False)


@config_options(RagConfig)
@config_options(ChainConfig)
@config_options(PromptConfig, skip=("seed",))
@config_options(GenerateConfig)
def generate(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="[MODEL] PROMPT",
        help="Model directory (left out: the bundled default model), then the prompt; - reads it from stdin. "
             "A lone argument that looks like a path is taken for a mistyped model: use --model default to send "
             "it as a prompt."),
    model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", autocompletion=complete_model_dirs,
                                        help=optional("The model directory, or default for the bundled model: "
                                                      "every argument is then the prompt.")),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", metavar="FILE",
                                              help=optional("Read the prompt from this file (- = stdin).")),
    rag: Optional[str] = typer.Option(None, "--rag", metavar="INDEX", help=optional(
        "Answer from the sources an index (`lbdl rag index`) retrieves for the prompt, cited as [1], [2].")),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Continue a prompt: `lbdl generate [MODEL] PROMPT`. The text streams to the terminal as it comes."""
    from ..sample.run import generate_text

    cfg = build(GenerateConfig, fields)
    prompt_cfg = build(PromptConfig, fields, base={"seed": cfg.seed or 0})  # --seed: the shots' selection too
    chains = build(ChainConfig, fields)
    rag_cfg = build(RagConfig, fields)
    model_arg, text = _model_and_prompt(list(args or []), prompt_file, model)
    out = sys.stdout
    if rag is not None:
        from .rag import answer

        return answer(model_arg, text, rag, rag_cfg, prompt_cfg, chains, cfg, as_json)
    if rag_cfg != RagConfig():
        raise ConfigError("--k, --mode and the other retrieval options need --rag INDEX")
    if prompt_cfg != PromptConfig(seed=cfg.seed or 0) or chains != ChainConfig():
        return _prompted(model_arg, text, prompt_cfg, chains, cfg, as_json)

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
            f"({runs_on(result)})[/dim]", soft_wrap=True)

    emit(result, as_json, render)


def _prompted(model_arg, query: str, prompt_cfg, chains, cfg, as_json: bool) -> None:
    """generate with a built prompt (--shots, --cot, --instruction, --format), K chains and their answers."""
    from ..prompting import prompted_generation

    if cfg.each_line or cfg.num_samples != 1:
        raise ConfigError("--each-line and --num-samples do not combine with a built prompt; use "
                          "--self-consistency K for K chains of one query")
    out = sys.stdout
    if chains.show_prompt and not as_json:
        err_console.print("[dim]--- prompt ---[/dim]")

    def on_text(new_text: str):
        out.write(new_text)
        out.flush()

    with progress_view(quiet=True) as listen:
        stream = None if as_json or chains.self_consistency > 1 else (
            on_text if chains.show_prompt else _after_prompt(on_text))
        result = prompted_generation(model_arg, query, prompt_cfg, chains, cfg, on_text=stream, progress=listen)

    def render():
        if result["chains"] == 1:
            out.write("\n")
        else:
            if chains.show_prompt:
                out.write(result["prompt"] + "\n")
            for i, (g, a) in enumerate(zip(result["results"], result["answers"])):
                out.write(f"--- chain {i + 1} ({g['finish_reason']}), answer {a} ---\n{g['text'].strip()}\n")
        out.flush()
        shots = f"{result['shots_used']} shots" + (f" ({result['shots_dropped']} dropped to fit the context)"
                                                   if result["shots_dropped"] else "")
        if result["answers"]:
            votes = ", ".join(f"{a}: {n}" for a, n in result["votes"].items()) or "no answer found"
            console.print(f"answer: {result['answer']} (votes {votes}); {shots}")
        else:
            err_console.print(f"[dim]{shots}[/dim]")

    emit(result, as_json, render)


def _after_prompt(on_text):
    """A streaming callback that leaves out its first call (the prompt): without --show-prompt only the
    continuation is printed."""
    state = {"first": True}

    def call(text: str):
        if state["first"]:
            state["first"] = False
            return
        on_text(text)

    return call
