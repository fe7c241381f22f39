"""A pipeline file read, ordered and checked: its steps as lbdl command lines, every problem with its TOML line.

The commands themselves come from a `find_command(words)` callable (the CLI passes one that walks its lazy
command table): this layer never imports `cli`, it only reads the click parameters it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import _check_one, _coerce, field_types
from ..errors import ConfigError, LbdlError
from ..files import read_text

NAME = re.compile(r"[A-Za-z0-9_-]+")
REFERENCE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
PIPELINE_KEYS = ("workdir", "state")
REPORT_KEYS = ("out", "title")  # [report]: where report.md/.json go, its heading
OUT_FIELDS = ("out", "png")  # a step's output: --out, or the file `lbdl plot --png` writes
SPECIAL = ("command",)  # step keys that are not the command's fields

FindCommand = Callable[[tuple], object]  # words after `lbdl` -> a click command; raises LbdlError when unknown


class PipelineError(ConfigError):
    """A pipeline file that cannot run (exit 2): the message names the file, the line and the step."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline file, where it is (line None: not in the file, e.g. a --set)."""

    message: str
    line: int | None = None
    step: str | None = None

    def text(self, path) -> str:
        where = f"{path}:{self.line}" if self.line else f"{path}"
        return f"{where}: " + (f"step {self.step}: " if self.step else "") + self.message


@dataclass(frozen=True)
class Step:
    name: str
    command: str  # the words after `lbdl`: "tokenizer train"
    fields: dict  # the command's fields as written (plus --set), references not yet replaced
    line: int  # the line of [steps.NAME]
    lines: dict  # field -> its line (0 for a --set)
    needs: tuple  # the steps whose out this one names, in first-mention order


@dataclass(frozen=True)
class Pipeline:
    path: Path
    workdir: Path  # every step runs here; relative paths in steps are relative to it
    state: Path  # fingerprints and results of the steps that ran
    vars: dict
    steps: dict  # name -> Step, in file order
    order: tuple  # names, references first, ties in file order
    problems: tuple  # found while reading: references to missing steps or variables, a cycle
    report: dict = field(default_factory=dict)  # the [report] table: out (relative to workdir), title


@dataclass(frozen=True)
class StepLine:
    """A step as a command line: `lbdl *argv` (no --json: the runner adds it)."""

    name: str
    words: tuple  # the command's words
    argv: list  # words, then positional arguments, then options
    out: str | None  # its --out, references replaced
    values: list = field(default_factory=list)  # every text value but out: the candidates for input paths
    given: dict = field(default_factory=dict)  # parameter name -> its value, references replaced (the report's)


# --- reading ------------------------------------------------------------------------------------------------------


def _toml(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"{where} is not valid TOML ({e})") from None


def _key_lines(text: str) -> dict:
    """{table: (line of its header, {key: line})} for every [table] of the text (tomllib gives no positions)."""
    header = re.compile(r"""^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$""")
    key = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")
    tables, current = {"": (0, {})}, ""
    for number, line in enumerate(text.splitlines(), 1):
        if m := header.match(line):
            current = ".".join(p.strip().strip("\"'") for p in m.group(1).split("."))
            tables.setdefault(current, (number, {}))
        elif m := key.match(line):
            tables[current][1].setdefault(next(g for g in m.groups() if g), number)
    return tables


def parse_set(text: str) -> tuple[str, str, object]:
    """--set STEP.field=value -> (step, field, value); the value read as TOML (a number, true, [..]), else text."""
    target, sep, value = text.partition("=")
    step, dot, key = target.strip().partition(".")
    if not sep or not dot or not step or not key:
        raise PipelineError(f"--set takes STEP.field=value (e.g. train.max_steps=20), got {text!r}")
    try:
        parsed = _toml(f"v = {value}", "")["v"]
    except PipelineError:
        parsed = value
    return step, key.strip(), parsed


def references(value) -> list[str]:
    """The {names} that a value (text, or a list of texts) refers to, in order."""
    if isinstance(value, list):
        return [name for v in value for name in references(v)]
    if not isinstance(value, str):
        return []
    return [m.group(1).strip() for m in REFERENCE.finditer(value) if m.group(1) is not None]


def substitute(value, lookup: Callable[[str], str]):
    """`value` with each {name} replaced by lookup(name); {{ and }} stand for literal braces."""
    if isinstance(value, list):
        return [substitute(v, lookup) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        return m.group(0)[0] if m.group(1) is None else lookup(m.group(1).strip())

    return REFERENCE.sub(one, value)


def read_pipeline(path, sets=()) -> Pipeline:
    """Read a pipeline file, apply `sets` (STEP.field=value texts) and order its steps. Fatal problems (no such
    file, not TOML, no steps, a bad [pipeline] table, a --set of a missing step) raise PipelineError; the rest
    (references to missing steps or variables, a cycle) are in .problems."""
    path = Path(path)
    text = read_text(path, "pipeline file")
    data = _toml(text, f"pipeline file {path}")
    lines = _key_lines(text)
    where = str(path)
    unknown = sorted(set(data) - {"pipeline", "vars", "steps", "report"})
    if unknown:
        line = lines.get(unknown[0], (0, {}))[0] or lines[""][1].get(unknown[0], 0)
        raise PipelineError(f"{where}:{line}: unknown table [{unknown[0]}]; a pipeline has [pipeline], [vars], "
                            f"[report] and [steps.NAME] tables")
    settings = data.get("pipeline", {})
    bad = sorted(set(settings) - set(PIPELINE_KEYS))
    if bad:
        raise PipelineError(f"{where}:{lines['pipeline'][1].get(bad[0], 0)}: unknown key {bad[0]!r} in "
                            f"[pipeline]; valid keys: {', '.join(PIPELINE_KEYS)}")
    report = data.get("report", {})
    for key, value in report.items():
        if key not in REPORT_KEYS or not isinstance(value, str) or not value.strip():
            raise PipelineError(f"{where}:{lines['report'][1].get(key, 0)}: [report] {key} = {value!r}: the keys are "
                                f"out = \"DIR\" (report.md and report.json, relative to workdir) and title = \"TEXT\"")
    variables = data.get("vars", {})
    for name, value in variables.items():
        if not isinstance(value, str) or not NAME.fullmatch(name) or name == "steps":
            raise PipelineError(f"{where}:{lines['vars'][1].get(name, 0)}: [vars] {name} must be a text value under "
                                f"a plain name (letters, digits, _ and -), got {value!r}")
    steps_data = data.get("steps")
    if not isinstance(steps_data, dict) or not steps_data:
        raise PipelineError(f"{where}: no steps; add a [steps.NAME] table with command = \"...\" for each step")
    workdir = (path.parent / settings.get("workdir", ".")).resolve()
    state = workdir / settings.get("state", f".lbdl-pipeline/{path.stem}")

    problems, steps = [], {}
    overrides: dict[str, dict] = {}
    for text_ in sets:
        step, key, value = parse_set(text_)
        if step not in steps_data:
            raise PipelineError(f"--set {text_}: no step {step!r} in {where}; steps: {', '.join(steps_data)}")
        overrides.setdefault(step, {})[key] = value
    for name, table in steps_data.items():
        header, key_lines = lines.get(f"steps.{name}", (0, {}))
        if not NAME.fullmatch(name):
            problems.append(Problem(f"step names are letters, digits, _ and -; got {name!r}", header, name))
        if not isinstance(table, dict):
            problems.append(Problem("a step is a table: [steps.NAME] with command = \"...\"", header, name))
            continue
        table = {**table, **overrides.get(name, {})}
        key_lines = {**key_lines, **{k: 0 for k in overrides.get(name, {})}}
        command = table.pop("command", None)
        if not isinstance(command, str) or not command.split():
            problems.append(Problem("no command: give command = \"WORDS AFTER lbdl\" (e.g. \"tokenizer train\")",
                                    header, name))
            command = ""
        needs = []
        for key, value in table.items():
            for ref in references(value):
                problem = _check_reference(ref, steps_data, variables)
                if problem:
                    problems.append(Problem(f"{key}: {problem}", key_lines.get(key, header), name))
                elif ref.startswith("steps.") and ref.split(".")[1] not in needs:
                    needs.append(ref.split(".")[1])
        steps[name] = Step(name, " ".join(command.split()), table, header, key_lines, tuple(needs))
    order, cycle = _order(steps)
    if cycle:
        problems.append(Problem(f"the steps form a cycle: {' -> '.join(cycle)} (each names the next one's out); "
                                f"break it", steps[cycle[0]].line, cycle[0]))
    return Pipeline(path, workdir, state, dict(variables), steps, tuple(order), tuple(problems), dict(report))


def _check_reference(ref: str, steps: dict, variables: dict) -> str | None:
    parts = ref.split(".")
    if parts[0] != "steps":
        if ref in variables:
            return None
        close = difflib.get_close_matches(ref, list(variables), n=1)
        hint = f" (did you mean {{{close[0]}}}?)" if close else "; define it in [vars] or write {{ for a brace"
        return f"unknown variable {{{ref}}}{hint}"
    if len(parts) != 3 or parts[2] != "out":
        return f"{{{ref}}} is not a reference: write {{steps.NAME.out}}"
    if parts[1] not in steps:
        close = difflib.get_close_matches(parts[1], list(steps), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; steps: {', '.join(steps)}"
        return f"{{{ref}}} names a missing step {parts[1]!r}{hint}"
    return None


def _order(steps: dict) -> tuple[list, list | None]:
    """The steps with each after the steps it names, ties in file order; and a cycle (names, first repeated
    last) when there is one (the order is then completed in file order)."""
    order, placed = [], set()
    remaining = list(steps)
    while remaining:
        ready = next((n for n in remaining if all(d in placed or d not in steps for d in steps[n].needs)), None)
        if ready is None:
            return order + remaining, _cycle(remaining, steps)
        order.append(ready)
        placed.add(ready)
        remaining.remove(ready)
    return order, None


def _cycle(remaining: list, steps: dict) -> list:
    """A cycle among the remaining steps (each waits for one of them): follow the first waiting dependency."""
    path, current = [], remaining[0]
    while current not in path:
        path.append(current)
        current = next(d for d in steps[current].needs if d in remaining)
    return path[path.index(current):] + [current]


# --- steps as command lines ---------------------------------------------------------------------------------------


def parameters(command) -> dict:
    """{field name: click parameter} of a command: each parameter by its own name and by its long flag
    (--eval-file -> eval_file); --json and --help are the runner's."""
    names = {}
    for p in command.params:
        if p.name in ("as_json", "help") or p.name.startswith("former__"):
            continue
        names[p.name] = p
        for opt in p.opts:
            if opt.startswith("--"):
                names.setdefault(opt[2:].replace("-", "_"), p)
    return names


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def step_line(pipeline: Pipeline, step: Step, command) -> tuple[StepLine, list]:
    """The step's command line and the problems found building it: unknown fields, values of the wrong kind,
    missing required ones, values click or the command's config refuses."""
    problems = []

    def problem(message, key=None):
        problems.append(Problem(message, step.lines.get(key, step.line) if key else step.line, step.name))

    def lookup(ref: str) -> str:
        if ref.startswith("steps."):
            other = pipeline.steps.get(ref.split(".")[1])
            if other is None:
                raise KeyError(ref)  # a missing step: reported while reading
            out = next((other.fields[k] for k in OUT_FIELDS if k in other.fields), None)
            if not isinstance(out, str):
                raise _NoOut(ref.split(".")[1])
            return substitute(out, lookup)
        return pipeline.vars[ref]

    params = parameters(command)
    values: dict = {}
    unresolved = set()
    ctx = command.context_class(command, info_name=step.command.split()[-1])
    for key, raw in step.fields.items():
        param = params.get(key)
        if param is None:
            close = difflib.get_close_matches(key, list(params), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; see `lbdl {step.command} --help`"
            problem(f"`lbdl {step.command}` has no field {key!r}{hint}", key)
            continue
        if param.name in values:
            problem(f"{key!r} and another key both set {param.name!r}; keep one", key)
            continue
        if isinstance(raw, dict) or (isinstance(raw, list) and any(isinstance(v, (dict, list)) for v in raw)) or \
                not isinstance(raw, (str, int, float, bool, list)):
            problem(f"{key} must be a text, number, boolean or array of them, got {raw!r}", key)
            continue
        try:
            value = substitute(raw, lookup)
        except _NoOut as e:
            problem(f"{key}: step {e.args[0]} has no out to refer to (give it out = \"...\")", key)
            continue
        except (KeyError, RecursionError):
            unresolved.add(param.name)  # an unknown variable or step, a cycle of outs: reported while reading
            continue
        many = param.multiple or param.nargs == -1
        if isinstance(value, list) and not many:
            problem(f"{key} takes one value, got the array {value!r}", key)
            continue
        if many and not isinstance(value, list):
            value = [value]
        if getattr(param, "is_flag", False) and not isinstance(value, bool):
            problem(f"{key} is a switch: give true or false, got {value!r}", key)
            continue
        try:
            converted = param.type_cast_value(ctx, [_text(v) for v in value] if many else
                                              value if isinstance(value, bool) else _text(value))
        except Exception as e:  # click's BadParameter: not a number, not one of the choices
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            problem(f"{key}: {message}", key)
            continue
        values[param.name] = (key, value, converted)
    problems += _config_problems(step, command, values)

    positional, options = [], []
    for p in command.params:
        if p.name not in values:
            if p.required and p.name != "as_json" and p.name not in unresolved:
                flag = next((o for o in p.opts if o.startswith("--")), None)
                what = (f"argument {p.name}" if p.param_type_name == "argument"
                        else f"field {flag[2:].replace('-', '_')}")
                problem(f"`lbdl {step.command}` needs its {what}")
            continue
        _, value, _ = values[p.name]
        if p.param_type_name == "argument":
            positional += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
            continue
        flag = next(o for o in p.opts if o.startswith("--"))
        if getattr(p, "is_flag", False):
            if p.secondary_opts:
                options.append(flag if value else p.secondary_opts[0])
            elif value:
                options.append(flag)
        else:
            for v in value if isinstance(value, list) else [value]:
                options += [flag, _text(v)]
    force = next((p for p in command.params if p.name == "force" and getattr(p, "is_flag", False)), None)
    if force is not None and "force" not in values:
        options.append("--force")  # the pipeline owns its outputs: a rerun replaces them
    named = next((k for k in OUT_FIELDS if k in values and isinstance(values[k][1], str)), None)
    out = values[named][1] if named else None
    texts = [v for name, (_, value, _) in values.items() if name != named
             for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    words = tuple(step.command.split())
    given = {name: value for name, (_, value, _) in values.items()}
    return StepLine(step.name, words, [*words, *positional, *options], out, texts, given), problems


class _NoOut(Exception):
    pass


def _config_problems(step: Step, command, values: dict) -> list:
    """Each given field checked as the command's config checks it: its type, range and choices (one field at a
    time: checks across fields are left to the command)."""
    problems = []
    for cls in getattr(getattr(command, "callback", None), "config_classes", ()):
        hints = field_types(cls)
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
        for name, (key, value, converted) in values.items():
            if name not in meta or converted is None:
                continue
            try:
                plain = list(converted) if isinstance(converted, tuple) else converted
                coerced = _coerce(plain, hints[name], cls.config_name(), name)
                for v in coerced if isinstance(coerced, tuple) else (coerced,):
                    if v is not None and meta[name]:
                        _check_one(cls.config_name(), name, v, meta[name])
            except ConfigError as e:
                problems.append(Problem(str(e), step.lines.get(key, step.line), step.name))
    return problems


def check(pipeline: Pipeline, find_command: FindCommand) -> tuple[dict, list]:
    """({name: StepLine}, every problem of the file in line order): the reading's problems, unknown commands,
    and each step's fields and values."""
    problems, lines = list(pipeline.problems), {}
    for name in pipeline.order:
        step = pipeline.steps[name]
        if not step.command:
            continue
        try:
            command = find_command(tuple(step.command.split()))
        except LbdlError as e:
            problems.append(Problem(str(e), step.lines.get("command", step.line), name))
            continue
        lines[name], found = step_line(pipeline, step, command)
        problems += found
    problems.sort(key=lambda p: (p.line or 1 << 30))
    return lines, problems


def command_lines(pipeline: Pipeline, find_command: FindCommand) -> dict:
    """{name: StepLine} of a pipeline without problems; the first problem (and how many more) as a PipelineError."""
    lines, problems = check(pipeline, find_command)
    if problems:
        more = f" (and {len(problems) - 1} more: see `lbdl pipeline validate`)" if len(problems) > 1 else ""
        raise PipelineError(problems[0].text(pipeline.path) + more)
    return lines
