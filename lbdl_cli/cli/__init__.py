"""The `lbdl` command line: one Typer app, one module per command group, each loaded when its command runs.

COMMANDS names every command, the module whose `register(app)` defines it, and the line `lbdl --help` shows
for it (a test checks that line against the command's own help), so `lbdl --help` and `lbdl COMMAND --help`
import only what they show: no torch, no numpy, no config of another command.

Errors are one line on stderr whatever raised them: bad input and usage (exit 2), a run that failed (exit 1,
130 for an interrupt), a bug (exit 1); LBDL_DEBUG=1 adds the traceback and keeps the exit code.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import traceback

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import LbdlError, RunFailed
from .options import house_style

try:  # recent typers carry their own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

COMMANDS = {  # name: (module in this package, the line `lbdl --help` shows)
    "init": ("model", "Create a freshly initialised model from a preset and check it with one forward pass."),
    "presets": ("model", "List the model presets with their shapes and parameter counts."),
    "info": ("model", "Show a model's config, parameter count, size, dtype, tokenizer and quantization; or this "
                      "machine (--system)."),
    "tokenizer": ("tokenizer", "Train and use BPE tokenizers (sentencepiece, exact round trips)."),
    "data": ("data", "Prepare corpora: tokenize text into train/val token shards."),
    "train": ("train", "Pretrain a model from a preset, or fine-tune all weights of a model (--init-from)."),
    "lr-find": ("train", "Learning-rate range test: train briefly at each lr of 1e-5..1 (half-decades) and suggest "
                         "one."),
    "plot": ("train", "Draw the training and validation loss curves of a run."),
    "finetune": ("train", "Fine-tune a model on instruction records: LoRA adapters, QLoRA on a quantized base, or "
                          "every weight."),
    "generate": ("generate", "Continue a prompt: `lbdl generate [MODEL] PROMPT`. The text streams to the terminal "
                             "as it comes."),
    "eval": ("eval", "Evaluate a model: perplexity of a text, accuracy on a task file."),
    "quantize": ("quantize", "Quantize a model: `lbdl quantize MODEL --type q4_k --out DIR` (see `lbdl quantize "
                             "MODEL --help`), or compare every type: `lbdl quantize sweep MODEL --eval FILE`."),
    "lora": ("lora", "LoRA adapters: merge one into its base model."),
    "merge": ("merge", "Merge fine-tunes of one base: task arithmetic, TIES, DARE, SLERP, layer recombination: "
                       "`lbdl merge --base B --model M1 --model M2 --out DIR` (see `lbdl merge run --help`, `lbdl "
                       "merge --list`), or search a merge scored on tasks: `lbdl merge search`."),
    "rag": ("rag", "Retrieval-augmented generation: index your files (`lbdl rag index DOCS... --out INDEX`), then "
                   "retrieve from them and answer with a model (`lbdl rag query INDEX QUESTION --answer-with MODEL`)."),
    "pipeline": ("pipeline", "Pipeline files: run lbdl steps from a TOML file, each rerun only when its options or "
                             "inputs changed (`lbdl pipeline run FILE`), check one (`validate`), or see what would run "
                             "(`show`)."),
    "convert": ("convert", "Re-save a model with its weights in another dtype (bfloat16 halves the size)."),
    "import": ("convert", "Import a Hugging Face model directory (safetensors, single or sharded) or a GGUF file."),
    "export": ("convert", "Export a model for another tool: `--to hf` writes a transformers directory, `--to gguf` a "
                          "llama.cpp file."),
}


@functools.cache
def _module_commands(module: str) -> dict:
    """The click commands that `module`'s register(app) defines, by name."""
    app = typer.Typer(rich_markup_mode=None, add_completion=False)
    app.callback()(lambda: None)  # a group even for a module with one command
    importlib.import_module(f"{__name__}.{module}").register(app)
    commands = typer.main.get_command(app).commands
    for command in commands.values():
        house_style(command)
    return commands


class LazyGroup(TyperGroup):
    """The root group: commands listed from COMMANDS, loaded one module at a time."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        return _module_commands(COMMANDS[name][0]).get(name)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, line) for name, (_, line) in COMMANDS.items()])


def _version(value: bool):
    if value:
        typer.echo(f"lbdl {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        cls=LazyGroup,
        name="lbdl",
        help="Train, evaluate, quantize and sample small language models.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version and exit."),
    ):
        """Train, evaluate, quantize and sample small language models."""

    return app


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 ok, 1 runtime failure, 2 bad input or usage."""
    command = typer.main.get_command(build_app())
    debug = os.environ.get("LBDL_DEBUG", "") not in ("", "0")
    try:
        code = command.main(args=argv, prog_name="lbdl", standalone_mode=False)
    except LbdlError as e:
        _fail(f"lbdl: error: {e}", 2, debug)
    except ClickException as e:  # usage: an unknown option, a missing argument, a non-number for a number
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path if ctx is not None else 'lbdl'} --help`)"
        _fail(f"lbdl: error: {e.format_message()}{hint}", 2 if e.exit_code == 2 else e.exit_code, debug)
    except RunFailed as e:
        _fail(f"lbdl: {e}", 130 if getattr(e, "exit_code", None) == 130 else 1, debug)
    except (KeyboardInterrupt, typer.Abort):
        _fail("lbdl: interrupted", 130, debug)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # a bug or a runtime failure: one line unless debugging
        message = str(e).splitlines()[0] if str(e) else ""
        _fail(f"lbdl: failed: {type(e).__name__}: {message} (set LBDL_DEBUG=1 for the traceback)", 1, debug)
    sys.exit(code if isinstance(code, int) else 0)
