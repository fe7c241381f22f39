"""Command-line flags made from config dataclasses: one flag per field, its default and help from the field.

    @app.command("sweep")
    @config_options(SweepConfig)
    def sweep(model: str = typer.Argument(...), as_json: bool = JSON_OPTION, **fields):
        cfg = build(SweepConfig, fields)

Every generated flag defaults to None ("not given"), so the config's own default applies and
`--help` shows it; a TOML file's values (where a command takes one) sit between the two.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from ..config import field_types, optional_inner
from ..errors import ConfigError


class Group(TyperGroup):
    """A command group whose --help lists each command with its whole first sentence (click cuts it at 45
    characters)."""

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class DefaultCommandGroup(Group):
    """A group with a hidden default command: `lbdl quantize MODEL ...` runs its hidden `model` command (the
    group's first), `lbdl quantize sweep ...` the sweep."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


class _ParentPath(typer.Context):
    """The hidden command's context: usage lines and hints say `lbdl quantize MODEL`, not `lbdl quantize model`."""

    @property
    def command_path(self) -> str:
        return self.parent.command_path if self.parent is not None else super().command_path


class DefaultCommand(TyperCommand):
    context_class = _ParentPath


def house_style(command) -> None:
    """Usage lines in the classic style, `lbdl eval perplexity [OPTIONS] MODEL FILE`: recent typers write a
    required argument as {MODEL}."""
    for param in getattr(command, "params", ()):
        if param.param_type_name == "argument":
            name = param.metavar or param.name.upper()
            if " " in name:  # a metavar that spells its own usage: generate's "[MODEL] PROMPT"
                shown = name
            else:
                shown = (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else "")
            param.get_usage_pieces = lambda ctx, shown=shown: [shown]
    for sub in getattr(command, "commands", {}).values():
        house_style(sub)


def group(help: str, **kwargs) -> typer.Typer:
    """A command group (`lbdl eval`, `lbdl data`...) in the house style: plain help, listed in full."""
    return typer.Typer(help=help, cls=kwargs.pop("cls", Group), no_args_is_help=True, rich_markup_mode=None,
                       **kwargs)


# --- the arguments and options that many commands share: one spelling, one check, one completion ---------


def _skip(ctx) -> bool:
    return ctx is None or ctx.resilient_parsing  # shell completion parses without checking


def _model_dir(ctx: typer.Context, value: Optional[str]):
    if value is not None and not _skip(ctx):
        from ..checkpoint.configs import read_config

        read_config(value)  # torch-free: a missing or broken model fails before torch is imported
    return value


def _input_file(what: str):
    def check(ctx: typer.Context, value):
        if value is None or _skip(ctx) or value == "-":
            return value
        from pathlib import Path

        from ..errors import DataError

        path = Path(value)
        if not path.is_file():
            raise DataError(f"{what} {value} does not exist" if not path.exists() else f"{what} {value} is not a file")
        return value

    return check


def complete_model_dirs(incomplete: str) -> list[str]:
    """The directories that complete the typed prefix: model directories, and the folders on the way to them."""
    import os
    from pathlib import Path

    head, _, _ = incomplete.rpartition(os.sep)
    base = Path(head or ".")
    try:
        entries = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    names = [(f"{head}{os.sep}" if head else "") + p.name for p in entries]
    return [n for n in names if n.startswith(incomplete)]


def complete_presets(incomplete: str) -> list[str]:
    from ..checkpoint.configs import preset_names

    return [name for name in preset_names() if name.startswith(incomplete)]


def model_argument(help: str = "Model directory.", required: bool = True):
    """The MODEL argument: checked (exists, has a readable config.json) before the command imports torch."""
    return typer.Argument(... if required else None, metavar="MODEL", help=help, callback=_model_dir,
                          autocompletion=complete_model_dirs, show_default=False)


def file_argument(help: str, what: str = "file", metavar: str = "FILE"):
    """An input file argument, checked to exist before any work (- passes: stdin)."""
    return typer.Argument(..., metavar=metavar, help=help, callback=_input_file(what), show_default=False)


def optional(help: str, required: bool = False) -> str:
    """The help of an option whose default is "not given"."""
    return help if required else f"{help} [default: none]"


def file_option(flag: str, help: str, what: str = "file", required: bool = False, metavar: str = "FILE"):
    return typer.Option(... if required else None, flag, metavar=metavar, help=optional(help, required),
                        callback=_input_file(what), show_default=False)


def out_option(help: str = "Output directory.", required: bool = True):
    """--out DIR: always a directory (a single output file is --png FILE and so on)."""
    return typer.Option(... if required else None, "--out", metavar="DIR", help=optional(help, required),
                        show_default=False)


def png_option(help: str):
    return typer.Option(None, "--png", metavar="FILE", help=optional(help + " (needs matplotlib)."),
                        show_default=False)


COMPLETIONS = {"MODEL": complete_model_dirs, "PRESET": complete_presets}


def _flag_type(hint):
    inner, _ = optional_inner(hint)
    if getattr(inner, "__origin__", None) is tuple:
        return list[inner.__args__[0]], True
    return inner, False


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


def _metavar(kind, meta) -> str:
    """N for an integer, X for a number, a short choice list as [a|b|c], TEXT otherwise."""
    choices = meta.get("choices")
    if choices and len("|".join(map(str, choices))) <= 30:
        return "[" + "|".join(map(str, choices)) + "]"
    return {int: "N", float: "X"}.get(kind, "NAME" if choices else "TEXT")


def config_options(config_cls, skip: tuple = ()):
    """Decorator: add one keyword-only flag per field of `config_cls` (except `skip` and fields with cli=False)
    to the command's signature; the command gets them in **kwargs."""

    def decorate(func):
        own = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params, annotations = list(own), {p.name: p.annotation for p in own}
        hints = field_types(config_cls)
        for f in dataclasses.fields(config_cls):
            meta = f.metadata or {}
            if f.name in skip or f.name in annotations or not meta.get("cli", True):
                continue
            kind, multiple = _flag_type(hints[f.name])
            default = f.default
            name = meta.get("flag") or "--" + f.name.replace("_", "-")
            decls = [f"{name}/--no-{name[2:]}" if kind is bool else name]
            if meta.get("short"):
                decls.append(meta["short"])
            help_text = meta.get("help", "")
            if meta.get("choices") and "|" not in help_text:
                help_text += f" One of: {', '.join(map(str, meta['choices']))}."
            if multiple and "repeat" not in help_text:
                help_text += " (repeatable)"
            shown = ("on" if default else "off") if kind is bool else _show(default)
            help_text += f" [default: {shown}]"
            metavar = None if kind is bool else meta.get("metavar") or _metavar(kind, meta)
            option = typer.Option(None, *decls, help=help_text, show_default=False, metavar=metavar,
                                  autocompletion=COMPLETIONS.get(metavar))
            annotation = Optional[kind]
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
            annotations[f.name] = annotation

        for old, new in config_cls.RENAMED.items():  # the former flag, hidden, for one release
            if new in annotations and new not in skip:
                name = f"{ALIAS}{old}"
                option = typer.Option(None, "--" + old.replace("_", "-"), hidden=True)
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                                annotation=annotations[new]))
                annotations[name] = annotations[new]

        def command(**kwargs):
            return func(**kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = annotations
        command.__doc__ = func.__doc__
        command.__name__ = func.__name__
        command.config_classes = (*getattr(func, "config_classes", ()), config_cls)  # stacked decorators add up
        return command

    return decorate


ALIAS = "former__"  # the parameter name of a renamed flag: former__ctx carries --ctx


def given(config_cls, kwargs: dict) -> dict:
    """The flags of `config_cls` that were given on the command line (not None); a former flag name
    (Config.RENAMED) counts as its new one, with a note on stderr."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in kwargs.items() if k in names and v is not None}
    for key, value in kwargs.items():
        old = key.removeprefix(ALIAS)
        if key.startswith(ALIAS) and value is not None and old in config_cls.RENAMED:
            new = config_cls.RENAMED[old]
            flag, now = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
            if new in values:
                raise ConfigError(f"give {now} only ({flag} is its former name)")
            from .output import note

            note(f"note: {flag} is now {now}; the old name goes away in the next release")
            values[new] = value
    return values


def build(config_cls, kwargs: dict, base: dict | None = None):
    """config_cls from `base` (defaults, or a TOML file's fields) with the given flags on top."""
    return config_cls.from_dict({**(base or {}), **given(config_cls, kwargs)})
