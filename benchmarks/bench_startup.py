"""Start-up time of the `lbdl` command line (issue #12): `lbdl --help`, every `lbdl COMMAND --help` and a few
errors that need no model, each as a fresh process, against `python -c pass` and `python -c "import typer"`.

    python benchmarks/bench_startup.py [--repeats 7] [--json FILE]

The invocations come from the code: lbdl_cli.cli.COMMANDS, and for a command group its click sub-commands
(hidden ones left out; `lbdl quantize MODEL --help` added by hand, with models/default). Each runs --repeats
times through the installed `lbdl` entry point (or `python -m lbdl_cli` when there is none), round-robin after
one warm-up run of each, output to /dev/null; the table gives the median and the minimum wall time, the median
over `python -c pass`'s, and whether torch was imported, read from one run under `python -X importtime`.
Bytecode is cached as after an installed lbdl's first run, in a temporary PYTHONPYCACHEPREFIX (so nothing is
written into the checkout, and PYTHONDONTWRITEBYTECODE is ignored); --as-is runs with the environment unchanged.
A median over the budget (0.3 s) is marked "over". It only reports: the exit status is 0 whatever it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 0.3  # seconds, issue #12
EARLY_ERRORS = [  # errors that need no model and no torch
    ["info", "nope"],
    ["eval", "perplexity", "nope", "x.txt"],
    ["generate", "runs/typo_model"],
    ["train", "--max-steps", "abc"],
    ["quantize", "nope", "--type", "q4_0", "--out", "/tmp/x"],
]
HEAVY = ("torch", "numpy", "pydantic")  # modules whose import the torch column (and the JSON) looks for


def help_invocations() -> list[list[str]]:
    """`--help`, then `C --help` for every command and `C S --help` for every visible sub-command of a group."""
    import typer

    from lbdl_cli import cli

    root = typer.main.get_command(cli.build_app())
    ctx = root.context_class(root, info_name="lbdl")
    rows = [["--help"]]
    for name in cli.COMMANDS:
        command = root.get_command(ctx, name)
        rows.append([name, "--help"])
        if not hasattr(command, "list_commands"):
            continue
        sub_ctx = command.context_class(command, info_name=name, parent=ctx)
        for sub in command.list_commands(sub_ctx):
            if not command.get_command(sub_ctx, sub).hidden:
                rows.append([name, sub, "--help"])
        if name == "quantize":  # the hidden default command: `lbdl quantize MODEL ...`
            rows.append([name, "models/default", "--help"])
    return rows


def imported(argv: list[str], env: dict) -> dict[str, bool]:
    """Which of HEAVY one run of argv (a `python ...` command line) imports, from -X importtime's report."""
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    return {name: name in modules for name in HEAVY}


def wall(argv: list[str], env: dict) -> tuple[float, int]:
    t = time.perf_counter()
    rc = subprocess.run(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - t, rc


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (default 7)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--as-is", action="store_true",
                        help="keep the environment's bytecode settings (no private bytecode cache)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-pycache-") as cache:
        env = dict(os.environ)
        if not args.as_is:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = cache
        run(args, env)


def run(args, env: dict) -> None:

    python = sys.executable
    entry = shutil.which("lbdl")
    launcher = [entry] if entry else [python, "-m", "lbdl_cli"]
    cases = [("python -c pass", [python, "-c", "pass"], [python, "-c", "pass"]),
             ('python -c "import typer"', [python, "-c", "import typer"], [python, "-c", "import typer"])]
    for rest in help_invocations() + EARLY_ERRORS:
        cases.append(("lbdl " + " ".join(rest), launcher + rest, [python, "-m", "lbdl_cli", *rest]))

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    codes: dict[str, int] = {}
    for label, argv, _ in cases:  # warm-up: bytecode caches, page cache
        codes[label] = wall(argv, env)[1]
    for _ in range(args.repeats):  # round-robin, so that a burst of load falls on every row alike
        for label, argv, _ in cases:
            seconds, codes[label] = wall(argv, env)
            times[label].append(seconds)
    load_after = os.getloadavg()
    modules = {label: imported(probe, env) for label, _, probe in cases}

    base = statistics.median(times["python -c pass"])
    rows = []
    for label, _, _ in cases:
        median = statistics.median(times[label])
        rows.append({"command": label, "median_s": median, "min_s": min(times[label]), "x_python": median / base,
                     "over_budget": label.startswith("lbdl") and median > BUDGET, "exit_code": codes[label],
                     "imports": modules[label], "times_s": times[label]})
        if args.json:
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "times_s"}), flush=True)

    from machine import capabilities  # benchmarks/machine.py; imports torch, so only after the timings

    print()
    print(f"machine: {capabilities()}")
    print(f"{os.cpu_count()} CPUs; Python {platform.python_version()}; typer {package_version('typer')}, "
          f"click {package_version('click')}, rich {package_version('rich')}"
          + ("; typer carries its own copy of click (typer._click)" if _typer_vendors_click() else ""))
    print(f"lbdl: {' '.join(launcher)}; {args.repeats} runs each; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.2f}' for x in load_before)} before, {', '.join(f'{x:.2f}' for x in load_after)} after")
    print("bytecode: " + ("as the environment has it (--as-is): PYTHONDONTWRITEBYTECODE="
                          f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}, PYTHONPYCACHEPREFIX="
                          f"{os.environ.get('PYTHONPYCACHEPREFIX', '')!r}" if args.as_is
                          else "cached by the warm-up run in a private PYTHONPYCACHEPREFIX"))
    print()
    print("| command | median s | min s | x python | torch imported | exit |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        over = " over" if r["over_budget"] else ""
        print(f"| `{r['command']}` | {r['median_s']:.3f}{over} | {r['min_s']:.3f} | {r['x_python']:.1f} | "
              f"{'yes' if r['imports']['torch'] else 'no'} | {r['exit_code']} |")
    if args.json:
        meta = {"machine": capabilities(), "python": platform.python_version(), "launcher": launcher,
                "repeats": args.repeats, "bytecode": "as-is" if args.as_is else "cached",
                "load_before": load_before, "load_after": load_after,
                "versions": {p: package_version(p) for p in ("typer", "click", "rich")}}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _typer_vendors_click() -> bool:
    import importlib.util

    return importlib.util.find_spec("typer._click") is not None


if __name__ == "__main__":
    main()
