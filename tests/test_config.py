"""The config base (lbdl_cli/config.py), the flags made from it (cli/options.py) and the progress protocol."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from lbdl_cli.cli.options import build, config_options
from lbdl_cli.config import Config, setting
from lbdl_cli.errors import ConfigError
from lbdl_cli.progress import Event, collect, report


@dataclass(frozen=True)
class InnerConfig(Config):
    k: int = setting(3, "An inner number.", low=1)


@dataclass(frozen=True)
class DemoConfig(Config):
    name: str = setting("q8_0", "A type.", choices=("q8_0", "q4_0"))
    rate: float = setting(0.5, "A rate.", low=0.0, high=1.0, low_open=True)
    count: int = setting(8, "A count.", low=1, high=64)
    limit: int | None = setting(None, "An optional limit (none: no limit).", low=1)
    stops: tuple[str, ...] = setting((), "Stop strings.")
    loud: bool = setting(False, "A switch.")
    inner: InnerConfig = setting(InnerConfig(), "A nested table.", cli=False)


def test_dict_and_toml_round_trips():
    c = DemoConfig(name="q4_0", rate=1.0, count=2, limit=5, stops=("\n", "END"), loud=True, inner=InnerConfig(k=9))
    assert DemoConfig.from_dict(c.to_dict()) == c
    assert DemoConfig.from_toml(c.to_toml()) == c
    assert DemoConfig.from_toml(c.to_toml(table="step"), table="step") == c
    default = DemoConfig()
    assert "limit" not in default.to_toml()  # None is left out of TOML, and comes back as the default
    assert DemoConfig.from_toml(default.to_toml()) == default
    assert c.to_dict()["stops"] == ["\n", "END"] and c.to_dict()["inner"] == {"k": 9}


def test_from_toml_reads_a_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('count = 4\nstops = ["a"]\n')
    assert DemoConfig.from_toml(path) == DemoConfig(count=4, stops=("a",))
    with pytest.raises(ConfigError, match="does not exist"):
        DemoConfig.from_toml(tmp_path / "missing.toml")
    path.write_text("count = = 4\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.toml is not valid TOML"):
        DemoConfig.from_toml(path)


@pytest.mark.parametrize("data, message", [
    ({"cout": 3}, r"demo config: unknown key 'cout'; valid keys: name, rate, count"),
    ({"count": "8"}, r"count must be a int, got '8'"),
    ({"count": True}, r"count must be a int, got True"),
    ({"count": 2.5}, r"count must be a int, got 2.5"),
    ({"stops": "x"}, r"stops must be a list of str"),
    ({"inner": {"j": 1}}, r"inner: unknown key 'j'"),
    ({"count": 0}, r"count must be in \[1, 64\], got 0"),
    ({"count": 65}, r"count must be in \[1, 64\], got 65"),
    ({"rate": 0}, r"rate must be in \(0, 1\], got 0"),
    ({"rate": float("inf")}, r"rate must be a finite number"),
    ({"limit": 0}, r"limit must be in \[1, inf\], got 0"),
    ({"name": "q5_0"}, r"name must be one of q8_0, q4_0, got 'q5_0'"),
    ({"inner": {"k": 0}}, r"k must be in \[1, inf\]"),
])
def test_bad_values_are_refused_by_name(data, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig.from_dict(data)


def test_ints_become_floats_and_replace_checks():
    assert DemoConfig.from_dict({"rate": 1}).rate == 1.0 and isinstance(DemoConfig.from_dict({"rate": 1}).rate, float)
    assert DemoConfig().replace(count=3).count == 3
    with pytest.raises(ConfigError, match="count must be in"):
        DemoConfig().replace(count=0)


def test_defaults_must_be_immutable():
    with pytest.raises(TypeError, match="immutable"):
        setting([], "a list")


def _app():
    app = typer.Typer(rich_markup_mode=None)  # the house style: plain help (cli/options.group)
    seen = {}

    @app.command()
    @config_options(DemoConfig)
    def run(model: str = typer.Argument(...), **fields):
        """Run the demo."""
        seen["config"] = build(DemoConfig, fields)

    return app, seen


def test_flags_come_from_the_config():
    app, seen = _app()
    runner = CliRunner()
    r = runner.invoke(app, ["m", "--count", "4", "--stops", "a", "--stops", "b", "--loud", "--limit", "7"])
    assert r.exit_code == 0, r.output
    assert seen["config"] == DemoConfig(count=4, stops=("a", "b"), loud=True, limit=7)
    r = runner.invoke(app, ["m"])
    assert seen["config"] == DemoConfig()  # a flag not given is the config's own default
    r = runner.invoke(app, ["m", "--help"], env={"COLUMNS": "300"})
    assert "[default: q8_0]" in r.output and "[default: 8]" in r.output and "--no-loud" in r.output
    assert "One of: q8_0, q4_0." in r.output and "--inner" not in r.output


def test_flag_values_are_range_checked():
    app, _ = _app()
    r = CliRunner().invoke(app, ["m", "--count", "0"])
    assert isinstance(r.exception, ConfigError) and "count must be in [1, 64], got 0" in str(r.exception)


def test_progress_events():
    assert report(None, "x", 1, 2) is None  # no listener: nothing happens
    events = []
    report(collect(events), "tokenizing", 10, 100, unit="tokens")
    report(collect(events), "tokenizing", message="careful", level="warning")
    assert events == [Event("tokenizing", 10, 100, unit="tokens"),
                      Event("tokenizing", message="careful", level="warning")]


def test_progress_view_in_a_pipe_prints_only_warnings(capsys):
    from lbdl_cli.cli.output import _count, progress_view

    with progress_view() as listen:
        listen(Event("x", 3, 10, unit="steps", message="an info line"))
        listen(Event("x", message="watch out", level="warning"))
    err = capsys.readouterr().err
    assert "watch out" in err and "warning" in err and "an info line" not in err
    assert _count(3, 10, "steps") == "3/10 steps" and _count(1536, 4096, "bytes") == "1.50 KiB/4.00 KiB"
    assert _count(7, None, "windows") == "7 windows"


def _command_configs() -> list[type]:
    """Every config class of the library (each command's options are one of them)."""
    import importlib

    for module in ("lbdl_cli.sample.run", "lbdl_cli.evaluate", "lbdl_cli.quantize", "lbdl_cli.data",
                   "lbdl_cli.train.config", "lbdl_cli.checkpoint.configs", "tokenizer.config"):
        importlib.import_module(module)
    found, todo = [], list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in ("lbdl_cli", "tokenizer", "quant"):
            found.append(cls)
    return sorted(set(found), key=lambda c: c.__name__)


def test_every_command_config_is_found():
    names = {c.__name__ for c in _command_configs()}
    assert {"SamplingConfig", "GenerateConfig", "PerplexityConfig", "TaskConfig", "QuantizeConfig", "SweepConfig",
            "PrepareConfig", "TrainConfig", "InitConfig", "ConvertConfig", "ImportConfig", "ExportConfig",
            "TokenizerConfig", "EncodeConfig", "DecodeConfig", "InspectConfig"} <= names


@pytest.mark.parametrize("cls", _command_configs(), ids=lambda c: c.__name__)
def test_every_command_config_round_trips_and_refuses_unknown_keys(cls):
    required = {"QuantizeConfig": {"type": "q4_0"}}.get(cls.__name__, {})  # a field with no default
    c = cls.from_dict(required)
    assert cls.from_dict(c.to_dict()) == c
    assert cls.from_toml(c.to_toml()) == c
    assert cls.from_toml(c.to_toml(table="step"), table="step") == c
    with pytest.raises(ConfigError, match=rf"{cls.config_name()}: unknown key 'no_such_key'"):
        cls.from_dict({**required, "no_such_key": 1})
