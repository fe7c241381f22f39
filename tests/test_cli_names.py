"""The command line's rules (docs/CLI.md), checked on every command and option of the app."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import typer

from lbdl_cli.cli import COMMANDS, build_app

ROOT_COMMAND = typer.main.get_command(build_app())
CTX = ROOT_COMMAND.make_context("lbdl", ["--help"], resilient_parsing=True)

RETIRED = {"--ctx": "--context", "--block-size": "--context", "--dtype": "--compute-dtype or --weights-dtype"}
CONCEPTS = {"--context": "N", "--out": "DIR", "--png": "FILE", "--device": "DEVICE", "--seed": "N",
            "--model": "MODEL", "--init-from": "MODEL", "--tokenizer": "TOKENIZER", "--config": "FILE",
            "--weights-dtype": "CHOICES", "--compute-dtype": "CHOICES"}
METAVAR = re.compile(r"^([A-Z]+(\|-)?|\[[a-z0-9_.-]+(\|[a-z0-9_.-]+)*\]|\[MODEL\] PROMPT)$")
FLAG = re.compile(r"^--[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def commands(command=ROOT_COMMAND, path=()):
    """(path, click command) of every leaf command, hidden ones too."""
    if hasattr(command, "list_commands"):
        names = command.list_commands(CTX)
        for name in names:
            yield from commands(command.get_command(CTX, name), (*path, name))
        for name, sub in getattr(command, "commands", {}).items():  # hidden ones are not always listed
            if name not in names:
                yield from commands(sub, (*path, name))
    else:
        yield " ".join(path), command


COMMANDS_ = list(commands())
OPTIONS = [(path, p) for path, c in COMMANDS_ for p in c.params
           if p.param_type_name == "option" and not p.hidden and p.name != "help"]


def test_every_command_is_walked():
    paths = {path for path, _ in COMMANDS_}
    assert {"train", "eval perplexity", "quantize model", "quantize sweep", "tokenizer train", "merge run",
            "merge search"} <= paths
    assert len(paths) == 29 and len(OPTIONS) > 150


@pytest.mark.parametrize("path,option", OPTIONS, ids=lambda v: v if isinstance(v, str) else v.opts[0])
def test_option_follows_the_rules(path, option):
    long = [o for o in option.opts if o.startswith("--")]
    assert len(long) == 1 and FLAG.match(long[0]), f"{path}: {option.opts} is not one kebab-case long flag"
    name = long[0]
    assert name not in RETIRED, f"{path}: {name} is retired; use {RETIRED.get(name)}"
    if option.is_bool_flag or option.is_flag:
        assert option.metavar is None, f"{path} {name}: a boolean is a flag, it takes no value"
        return
    metavar = option.metavar or ""
    assert METAVAR.match(metavar), f"{path} {name}: metavar {metavar!r} is not in the house style"
    if name in CONCEPTS:
        kind = "CHOICES" if metavar.startswith("[") else metavar
        assert kind == CONCEPTS[name], f"{path} {name}: metavar {metavar}, expected {CONCEPTS[name]}"
    assert option.required or "[default: " in (option.help or ""), f"{path} {name}: --help shows no default"


def _config_field(command, name):
    for cls in getattr(command.callback, "config_classes", ()):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name in fields:
            return fields[name]
        if name.startswith("former__") and name.removeprefix("former__") in cls.RENAMED:
            return fields[cls.RENAMED[name.removeprefix("former__")]]
    return None


@pytest.mark.parametrize("path,command", COMMANDS_, ids=[p for p, _ in COMMANDS_])
def test_every_numeric_option_is_a_config_field_with_a_range(path, command):
    for param in command.params:
        if param.type.name not in ("integer", "int", "float"):  # click spells int "integer", recent typers "int"
            continue
        field = _config_field(command, param.name)
        assert field is not None, f"{path} {param.opts}: a number that no config checks"
        assert field.metadata["low"] is not None and field.metadata["high"] is not None, \
            f"{path} {param.opts}: {field.name} needs both bounds in its config"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_root_help_lines_are_the_commands_own(name):
    command = ROOT_COMMAND.get_command(CTX, name)
    assert " ".join(command.help.split("\n\n")[0].split()) == COMMANDS[name][1]


def test_help_shows_usage_in_one_style_without_hidden_commands(cli, model_dir):
    for args, usage in [(("eval", "perplexity", "--help"), "Usage: lbdl eval perplexity [OPTIONS] MODEL FILE"),
                        (("quantize", str(model_dir), "--help"), "Usage: lbdl quantize [OPTIONS] MODEL"),
                        (("generate", "--help"), "Usage: lbdl generate [OPTIONS] [MODEL] PROMPT"),
                        (("info", "--help"), "Usage: lbdl info [OPTIONS] [MODEL]")]:
        r = cli(*args)
        assert r.code == 0 and r.out.splitlines()[0] == usage
    r = cli("train", "--help")
    assert "--resume RUN" in r.out and "--compile" in r.out and "--compile " + "BOOLEAN" not in r.out
    text = " ".join(r.out.split())
    assert "[default: 16]" in text and "[default: none]" in text and "[default: cosine]" in text


@pytest.mark.parametrize("args,says", [
    (("train", "--max-steps", "many"), "Invalid value for '--max-steps'"),
    (("nosuch",), "No such command 'nosuch'"),
    (("eval", "perplexity", "--nope"), "No such option: --nope"),
    (("init", "--preset"), "requires an argument"),
])
def test_usage_errors_are_one_line_exit_2(cli, args, says):
    r = cli(*args)
    assert r.code == 2 and says in r.err and len(r.err.strip().splitlines()) == 1
    assert r.err.startswith("lbdl: error: ") and "--help`)" in r.err


def test_former_flags_still_work_with_a_note(cli, model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    new = cli("eval", "perplexity", model_dir, text, "--context", "32", "--json").json()
    r = cli("eval", "perplexity", model_dir, text, "--ctx", "32", "--json")
    assert r.code == 0 and r.json()["perplexity"] == new["perplexity"]
    assert "--ctx is now --context" in r.err
    r = cli("eval", "perplexity", model_dir, text, "--ctx", "32", "--context", "32")
    assert r.code == 2 and "give --context only" in r.err


def test_shell_completion(model_dir):
    env = {**os.environ, "_LBDL_COMPLETE": "complete_bash", "COMP_WORDS": "lbdl init --preset ", "COMP_CWORD": "3"}
    run = [sys.executable, "-m", "lbdl_cli"]
    presets = subprocess.run(run, env=env, capture_output=True, text=True).stdout.split()
    assert {"nano", "gpt2-124m", "llama-tiny"} <= set(presets)
    prefix = str(model_dir)[:-2]
    env.update(COMP_WORDS=f"lbdl info {prefix}", COMP_CWORD="2")
    assert str(model_dir) in subprocess.run(run, env=env, capture_output=True, text=True).stdout.split()
    script = subprocess.run([*run, "--show-completion", "bash"], capture_output=True, text=True)
    assert script.returncode == 0 and "_LBDL_COMPLETE=complete_bash" in script.stdout


def test_errors_that_need_no_model_come_before_torch(tmp_path):
    code = ("import sys; from lbdl_cli.cli import main\n"
            "for args in (['info', 'nope'], ['eval', 'perplexity', 'nope', 'x.txt'], ['generate', 'runs/typo'],\n"
            "             ['quantize', 'nope', '--type', 'q4_0', '--out', 'x'], ['train', '--max-steps', 'x'],\n"
            "             ['convert', 'nope', '--out', 'x'], ['export', 'nope', '--out', 'x']):\n"
            "    try:\n"
            "        main(args)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 2, (args, e.code)\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "False"
