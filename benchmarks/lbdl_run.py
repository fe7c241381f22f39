"""The `lbdl` command line as the demonstration scripts run it: one subprocess per command, its `--json` result."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lbdl(args: list, log: Path) -> tuple[dict, float]:
    """Run `lbdl ARGS --json` (`python -m lbdl_cli`, in the repository); its JSON result (the last line of its
    output) and wall seconds. The whole output goes to `log`; a failure ends the script, naming the log."""
    cmd = [sys.executable, "-m", "lbdl_cli", *map(str, args), "--json"]
    print("$ lbdl " + " ".join(map(str, args)) + " --json", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"lbdl {' '.join(map(str, args))} failed (exit {proc.returncode}), see {log}:\n"
                         f"{proc.stderr.strip()[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]), wall
