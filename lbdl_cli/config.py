"""The base of every configuration: frozen dataclasses with one default and one help text per field,
dict and TOML round trips, unknown keys refused by name.

    @dataclass(frozen=True)
    class SweepConfig(Config):
        batch_size: int = setting(8, "Windows per forward pass.", low=1)
        types: tuple[str, ...] = setting((), "Types to try (default: all).")

    SweepConfig.from_dict({"batch_size": 4})            # types checked, ranges checked
    SweepConfig.from_toml(c.to_toml()) == c               # a pipeline step is a table of one

The CLI makes each field a flag with the field's default and help (cli/options.py), so a
default lives in exactly one place. Optional means None, never a sentinel value. None is left
out of TOML (which has no null) and comes back as the default, which is None. Torch-free, layer 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path

from .errors import ConfigError


def setting(default, help: str, *, low=None, high=None, low_open: bool = False, choices=None, flag: str | None = None,
            short: str | None = None, cli: bool = True, metavar: str | None = None):
    """A config field: its default, its --help text, and what the CLI and the range check need.

    `low`/`high` bound a number (inclusive; `low_open` makes the low bound exclusive), `choices`
    lists the allowed values of a text field, `flag` renames the CLI flag (default: --field-name),
    `short` adds a short flag, `cli=False` keeps the field out of the command line, `metavar` names
    the value in --help (default: N, X, TEXT or the choices; DIR, FILE, MODEL for paths)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open,
            "choices": tuple(choices) if choices else None, "flag": flag, "short": short, "cli": cli,
            "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
MAX_TOKENS = 1 << 20  # a context or a generation length: past this, memory runs out before anything useful happens
MAX_VOCAB = 1 << 20  # the largest real vocabularies are ~256K

DTYPE_CHOICES = ("auto", "float32", "bfloat16")  # float16 is refused on CPU (hundreds of times slower there)


def dtype_setting(help: str = "Compute dtype: auto (the stored one, or what is fast on this machine) | float32 | "
                              "bfloat16."):
    """The `dtype` field every command that runs a model shares."""
    return setting("auto", help, choices=DTYPE_CHOICES)


ENGINE_CHOICES = ("torch", "llama.cpp")


def engine_setting():
    """The `engine` field of the commands that generate or score text: lbdl's own, or llama.cpp's."""
    return setting("torch", "Inference engine: torch (lbdl's), or llama.cpp (the model exported to GGUF once, "
                            "cached, and run by llama-cpp-python: pip install 'lbdl[llama]'; merged models only).",
                   choices=ENGINE_CHOICES)


def device_setting(help: str = "auto (cuda when torch sees one) | cpu | cuda."):
    """The `device` field every command that runs a model shares (cuda:N is accepted too)."""
    return setting("auto", help, metavar="DEVICE")


def adapter_setting():
    """The `adapter` field of every command that runs a model: a LoRA adapter applied without merging."""
    return setting(None, "A LoRA adapter directory (PEFT format: a finetune run's best/, or PEFT's own) applied to "
                         "the model without merging.", metavar="DIR")


def force_base_setting():
    """With `adapter`: apply it to a base whose content hash is not the one the adapter recorded."""
    return setting(False, "Apply --adapter even when the base it was trained on had another content hash (the "
                          "shapes are checked anyway).")


def field_types(cls) -> dict[str, object]:
    """The resolved annotation of every field of a config class."""
    return typing.get_type_hints(cls)


def optional_inner(hint):
    """(inner type, True) for `X | None`, (hint, False) otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _describe(hint) -> str:
    inner, optional = optional_inner(hint)
    if typing.get_origin(inner) is tuple:
        name = f"list of {typing.get_args(inner)[0].__name__}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def _coerce(value, hint, where: str, key: str):
    """`value` as the field's type, or a ConfigError naming the key."""
    inner, optional = optional_inner(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} must be a {_describe(hint)}, got none")
    if typing.get_origin(inner) is tuple:
        item = typing.get_args(inner)[0]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a {_describe(hint)}, got {value!r}")
        return tuple(_coerce(v, item, where, key) for v in value)
    if dataclasses.is_dataclass(inner) and issubclass(inner, Config):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table of {inner.__name__} fields, got {value!r}")
        return inner.from_dict(value, where=f"{where}: {key}")
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a {_describe(hint)}, got {value!r}")
    if isinstance(inner, type) and not isinstance(value, inner):
        raise ConfigError(f"{where}: {key} must be a {_describe(hint)}, got {value!r}")
    if inner is float and math.isnan(value):
        raise ConfigError(f"{where}: {key} must be a number, got nan")
    return value


def _plain(value):
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class Config:
    """Mixin for frozen dataclasses: to_dict / from_dict / replace / TOML, and the range checks of `setting`.

    RENAMED maps a field's former name to its name now: from_dict accepts the old key (a TOML file or a saved
    run of an earlier release) and the CLI keeps the old flag, hidden, for one release."""

    RENAMED: dict[str, str] = {}  # not annotated in subclasses: a class attribute, not a field

    @classmethod
    def config_name(cls) -> str:
        """How errors name this config: "sweep config" for SweepConfig."""
        name = cls.__name__.removesuffix("Config")
        words = "".join(f" {c.lower()}" if c.isupper() else c for c in name).strip()
        return f"{words} config"

    def __post_init__(self):
        """The ranges and choices of every field; a subclass with checks of its own calls super().__post_init__()."""
        self.check_ranges()

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """Build from plain values (a TOML table, JSON): unknown keys and wrong types refused by name."""
        where = where or cls.config_name()
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a table of fields, got {d!r}")
        hints = field_types(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        d = cls.upgrade(d, where)
        unknown = sorted(set(d) - set(known))
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}{more}; valid keys: {', '.join(known)}")
        values = {k: _coerce(v, hints[k], where, k) for k, v in d.items()}
        return cls(**values)

    @classmethod
    def upgrade(cls, d: dict, where: str) -> dict:
        """`d` with the keys of RENAMED under their names now."""
        if not any(k in cls.RENAMED for k in d):
            return d
        d = dict(d)
        for old, new in cls.RENAMED.items():
            if old in d:
                if new in d:
                    raise ConfigError(f"{where}: give {new} only ({old} is its former name)")
                d[new] = d.pop(old)
        return d

    def replace(self, **changes):
        """A copy with some fields changed, checked as from_dict checks."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_toml(self, table: str | None = None) -> str:
        """The config as TOML (None fields left out: they are the default)."""
        import tomli_w

        data = _drop_none(self.to_dict())
        return tomli_w.dumps({table: data} if table else data)

    @classmethod
    def from_toml(cls, source: str | os.PathLike, table: str | None = None):
        """From TOML text or a .toml file (its `[table]` when named and present)."""
        data, where = read_toml(source)
        if table and isinstance(data.get(table), dict):
            data = data[table]
        return cls.from_dict(data, where=where)

    def check_ranges(self) -> None:
        """The `low`/`high`/`choices` of every field (Config.__post_init__ calls it)."""
        name = self.config_name()
        for f in dataclasses.fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            if value is None or not meta:
                continue
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                _check_one(name, f.name, v, meta)


def _check_one(where: str, key: str, v, meta) -> None:
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if math.isnan(v) or math.isinf(v) and (low is not None or high is not None):
        raise ConfigError(f"{where}: {key} must be a finite number, got {v}")
    too_low = low is not None and (v <= low if meta.get("low_open") else v < low)
    too_high = high is not None and v > high
    if too_low or too_high:
        left = "(" if meta.get("low_open") else "["
        lo = "-inf" if low is None else _number(low)
        hi = "inf" if high is None else _number(high)
        raise ConfigError(f"{where}: {key} must be in {left}{lo}, {hi}], got {_number(v)}")


def _number(v) -> str:
    """1048576 as 1048576 (not 1.04858e+06), 0.001 as 0.001."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def read_toml(source: str | os.PathLike) -> tuple[dict, str]:
    """(data, where) of TOML text or of a file path."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and "=" not in source):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist" if not path.exists() else f"{path} is not a file")
        from .files import read_text

        text, where = read_text(path, "config file"), f"config file {path}"
    else:
        text, where = str(source), "TOML config"
    try:
        return tomllib.loads(text), where
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML ({e})") from None
