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

from ..config import field_types, optional_inner
from ..errors import ConfigError


def _flag_type(hint):
    inner, _ = optional_inner(hint)
    if getattr(inner, "__origin__", None) is tuple:
        return list[inner.__args__[0]], True
    return inner, False


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


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
            if kind is bool:
                help_text += rf" \[default: {'on' if default else 'off'}]"  # rich markup: \[ is a bracket
            elif default is not None and default != ():
                help_text += rf" \[default: {_show(default)}]"
            option = typer.Option(None, *decls, help=help_text, show_default=False)
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
        command.config_class = config_cls
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
