"""Running a pipeline: fingerprints, the state of the steps that ran, what runs now, the run itself."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .. import __version__
from ..atomic import atomic_file
from ..progress import Progress, report
from .spec import Pipeline, PipelineError, StepLine, command_lines

Runner = Callable[[list, Path], tuple]  # (argv after `lbdl`, workdir) -> (exit code, stdout, stderr)
NUMBERS = ("best_val_loss", "val_loss", "perplexity", "bits_per_byte", "accuracy", "vocab_size", "train_tokens",
           "params", "size_bytes", "chunks", "steps")  # the key results a summary shows, the first three present
CHUNK = 1 << 20


# --- content hashes -----------------------------------------------------------------------------------------------


class Hashes:
    """sha256 of files, cached in the state directory by (size, mtime_ns, inode): a file whose three are unchanged
    is not read again, so a second run over big model directories costs a stat per file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def file(self, path: Path) -> str:
        st = path.stat()
        key, stamp = str(path), [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.known.get(key)
        if entry and entry[:3] == stamp:
            return entry[3]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        self.known[key] = [*stamp, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def tree(self, root: Path, skip: Path | None = None) -> str:
        """A directory: its files' relative paths and hashes, hidden entries (temporary siblings) and `skip` left
        out."""
        h = hashlib.sha256()
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(folder, d) != skip)
            for name in sorted(f for f in files if not f.startswith(".")):
                path = Path(folder, name)
                if path.is_file():
                    h.update(f"{path.relative_to(root).as_posix()}\0{self.file(path)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.changed:
            self.known = {k: v for k, v in self.known.items() if os.path.exists(k)}  # deleted files forgotten
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path, force=True) as tmp:
                tmp.write_text(json.dumps(self.known), encoding="utf-8")
            self.changed = False


def input_paths(line: StepLine, workdir: Path) -> list[Path]:
    """The existing files and directories among a step's values (globs expanded), its own out left out."""
    out = (workdir / line.out).resolve() if line.out else None
    found = []
    for value in line.values:
        if not value or "\n" in value or len(value) > 4096:
            continue
        candidates = glob.glob(value, root_dir=workdir, recursive=True) if glob.has_magic(value) else [value]
        for c in candidates:
            try:
                path = (workdir / c).resolve()
                if not path.exists() or (out is not None and (path == out or path.is_relative_to(out))):
                    continue
            except (OSError, ValueError):
                continue
            if path not in found:
                found.append(path)
    return sorted(found)


def fingerprint(line: StepLine, workdir: Path, hashes: Hashes) -> str:
    """sha256 of the command line, lbdl's version and the content of every input (not of the step's own out)."""
    out = (workdir / line.out).resolve() if line.out else None
    h = hashlib.sha256(json.dumps({"argv": line.argv, "version": __version__}).encode())
    for path in input_paths(line, workdir):
        content = hashes.tree(path, skip=out) if path.is_dir() else hashes.file(path)
        h.update(f"{path}\0{content}\n".encode())
    return h.hexdigest()


# --- state ----------------------------------------------------------------------------------------------------------


def read_state(pipeline: Pipeline, name: str) -> dict | None:
    try:
        return json.loads((pipeline.state / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_state(pipeline: Pipeline, name: str, record: dict) -> None:
    """Written (atomically) only once the step succeeded: a killed run leaves the previous record or none."""
    pipeline.state.mkdir(parents=True, exist_ok=True)
    with atomic_file(pipeline.state / f"{name}.json", force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")


def out_exists(pipeline: Pipeline, line: StepLine) -> bool:
    return line.out is None or (pipeline.workdir / line.out).exists()


def is_cached(pipeline: Pipeline, line: StepLine, fp: str, record: dict | None) -> bool:
    return bool(record) and record.get("fingerprint") == fp and record.get("out") == line.out and \
        out_exists(pipeline, line)


def key_numbers(result: dict) -> dict:
    numbers = {k: result[k] for k in NUMBERS
               if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)}
    return dict(list(numbers.items())[:3])


# --- what runs ------------------------------------------------------------------------------------------------------


def selection(pipeline: Pipeline, force=(), force_all: bool = False, only=(), start: str | None = None):
    """(the steps to consider, the steps forced): --only names them (forced), --from STEP takes it and every
    step after it in the order (forced), --force [STEP] forces every step or the named ones."""
    for name in [*force, *only, *([start] if start else [])]:
        if name not in pipeline.steps:
            raise PipelineError(f"no step {name!r} in {pipeline.path}; steps: {', '.join(pipeline.order)}")
    if only:
        chosen = [n for n in pipeline.order if n in only]
    elif start:
        chosen = list(pipeline.order[pipeline.order.index(start):])
    else:
        chosen = list(pipeline.order)
    forced = set(pipeline.order) if force_all else set(force)
    if only or start:
        forced |= set(chosen)
    return chosen, forced


def shell_script(pipeline: Pipeline, lines: dict, chosen: list) -> list[str]:
    """The equivalent shell commands: `cd WORKDIR`, then `lbdl ...` for each chosen step in order."""
    return [f"cd {shlex.quote(str(pipeline.workdir))}"] + [shlex.join(["lbdl", *lines[n].argv]) for n in chosen]


def show(pipeline: Pipeline, find_command, force=(), force_all=False, only=(), start=None) -> dict:
    """The step graph and what a run would do now: each step's needs, out, command and status (cached; run, with
    why; after upstream: cached now, but a step it needs runs first, so it runs if that output changes)."""
    lines = command_lines(pipeline, find_command)
    chosen, forced = selection(pipeline, force, force_all, only, start)
    hashes = Hashes(pipeline.state / "hashes.json")
    rows, running = [], set()
    for name in pipeline.order:
        line, step = lines[name], pipeline.steps[name]
        record = read_state(pipeline, name)
        if name not in chosen:
            status, why = "skipped", "not selected"
        elif name in forced:
            status, why = "run", "forced"
        elif record is None:
            status, why = "run", "never ran"
        elif not out_exists(pipeline, line):
            status, why = "run", "its out is missing"
        elif not is_cached(pipeline, line, fingerprint(line, pipeline.workdir, hashes), record):
            status, why = "run", "its options or inputs changed"
        elif running & set(step.needs):
            status, why = "after upstream", f"runs if {', '.join(sorted(running & set(step.needs)))} changes it"
        else:
            status, why = "cached", ""
        if status in ("run", "after upstream"):
            running.add(name)
        rows.append({"step": name, "command": step.command, "needs": list(step.needs), "out": line.out,
                     "status": status, "why": why, "argv": ["lbdl", *line.argv]})
    hashes.save()
    return {"pipeline": str(pipeline.path), "workdir": str(pipeline.workdir), "state": str(pipeline.state),
            "steps": rows}


# --- the run --------------------------------------------------------------------------------------------------------


def subprocess_runner(argv: list, workdir: Path) -> tuple:
    """Run `lbdl ARGV --json` as `python -m lbdl_cli` in `workdir`, its output captured."""
    done = subprocess.run([sys.executable, "-m", "lbdl_cli", *argv, "--json"], cwd=workdir, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
            return value if isinstance(value, dict) else {"value": value}
        except ValueError:
            continue
    return {}


def _error_line(stderr: str, stdout: str, code: int) -> str:
    text = [s for s in (stderr.strip() or stdout.strip()).splitlines() if s.strip()]
    line = text[-1].strip() if text else f"exit code {code}"
    for prefix in ("lbdl: error: ", "lbdl: "):  # the step's own one-line error, without the program's name
        line = line.removeprefix(prefix)
    return line


def run_pipeline(pipeline: Pipeline, find_command, force=(), force_all: bool = False, only=(),
                 start: str | None = None, progress: Progress | None = None, runner: Runner | None = None) -> dict:
    """Run the pipeline's steps in order: a step whose fingerprint and out are unchanged is cached; a failing
    step stops the run (earlier outputs and records stay; a rerun continues from it). Returns the run: each
    step's status (ran, cached, failed, skipped, not run), seconds, key numbers and JSON result."""
    runner = runner or subprocess_runner
    lines = command_lines(pipeline, find_command)
    chosen, forced = selection(pipeline, force, force_all, only, start)
    hashes = Hashes(pipeline.state / "hashes.json")
    rows, failed, error, began = [], None, None, time.monotonic()
    total = len(chosen)
    for name in pipeline.order:
        line = lines[name]
        row = {"step": name, "command": pipeline.steps[name].command, "status": "skipped", "seconds": 0.0,
               "out": line.out, "numbers": {}, "result": {}}
        rows.append(row)
        if name not in chosen:
            continue
        if failed:
            row["status"] = "not run"
            continue
        done = sum(r["status"] in ("ran", "cached") for r in rows)
        t0 = time.monotonic()
        fp = fingerprint(line, pipeline.workdir, hashes)
        record = read_state(pipeline, name)
        if name not in forced and is_cached(pipeline, line, fp, record):
            row.update(status="cached", result=record.get("result", {}), numbers=key_numbers(record.get("result", {})),
                       seconds=round(time.monotonic() - t0, 3))
            report(progress, "pipeline", done + 1, total, unit="steps", status=name, message=f"{name}: cached")
            continue
        ours = record is not None and record.get("out") == line.out
        if line.out and (pipeline.workdir / line.out).exists() and not ours and name not in forced and \
                pipeline.steps[name].fields.get("force") is not True:
            failed, error = name, (f"its out {line.out} exists and was not written by this step; remove it, or run "
                                   f"with --force {name}")
            row["status"], row["error"] = "failed", error
            continue
        report(progress, "pipeline", done, total, unit="steps", status=name,
               message=f"{name}: running {shlex.join(['lbdl', *line.argv])}")
        code, stdout, stderr = runner(list(line.argv), pipeline.workdir)
        row["seconds"] = round(time.monotonic() - t0, 3)
        if code != 0:
            failed, error = name, _error_line(stderr, stdout, code)
            row.update(status="failed", error=error, exit_code=code, stderr=stderr[-4000:])
            report(progress, "pipeline", done, total, unit="steps", status=name, message=f"{name}: failed: {error}")
            continue
        result = _last_json(stdout)
        row.update(status="ran", result=result, numbers=key_numbers(result))
        write_state(pipeline, name, {"step": name, "fingerprint": fp, "out": line.out, "argv": ["lbdl", *line.argv],
                                     "lbdl_version": __version__, "seconds": row["seconds"], "result": result,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        hashes.save()
        report(progress, "pipeline", done + 1, total, unit="steps", status=name,
               message=f"{name}: ran in {row['seconds']:.1f} s")
    hashes.save()
    result = {"pipeline": str(pipeline.path), "workdir": str(pipeline.workdir), "ok": failed is None,
              "failed": failed, "error": error, "seconds": round(time.monotonic() - began, 3), "steps": rows}
    if failed is None and pipeline.report.get("out"):
        result["report"] = write_pipeline_report(pipeline, lines, rows)
        result["seconds"] = round(time.monotonic() - began, 3)
    return result


def write_pipeline_report(pipeline: Pipeline, lines: dict, rows: list) -> dict:
    """The [report] table's report.md and report.json from every step's result (a step not run now: its last
    recorded one); not rewritten when those results are unchanged. Returns {out, files, written}."""
    from .report import FILES, build_report, unchanged, write_report

    out = pipeline.workdir / pipeline.report["out"]
    title = pipeline.report.get("title", f"{pipeline.path.stem} pipeline report")
    rows = [row if row["status"] != "skipped" else
            {**row, "result": (read_state(pipeline, row["step"]) or {}).get("result", {})} for row in rows]
    written = not unchanged(out, rows, lines, title)
    if written:
        report = build_report(rows, lines, pipeline.workdir, title=title, pipeline=str(pipeline.path))
        write_report(report, out, pipeline.workdir)
    return {"out": pipeline.report["out"], "files": [f"{pipeline.report['out']}/{f}" for f in FILES],
            "written": written}
