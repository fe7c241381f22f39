"""A pipeline's report: report.md and report.json from its steps' JSON results (a [report] table's out).

Every model the steps made or read is one row: a pretrained run's best/, a base with a fine-tune's adapter, a
merged or quantized directory, each variant of a quantization sweep. Its size and bits per weight come from the
directory (config.json and the safetensors header) or from the sweep's row; its perplexities and task scores from
the `eval perplexity` and `eval task` steps that named it (model, and adapter if any). The PNGs (`lbdl plot
--png`, a sweep's sweep.png) are listed by path; generations (few-shot, chain-of-thought, retrieval) are quoted.

The report is a function of the steps' results: `source` is their hash, and an unchanged one is not rewritten
(so a run with every step cached costs no model reads).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from ..atomic import atomic_dir
from ..errors import LbdlError

Describe = Callable[[Path], dict]  # a model directory -> {params, size_bytes, bits_per_weight}
FILES = ("report.md", "report.json")
VERSION = 1  # of the report's layout: a new one rewrites a report made from the same results
TRAINING = ("train", "finetune")
GENERATION = ("generate", "rag query")


def describe_model(path: Path) -> dict:
    """params, size_bytes (of the weights, as a sweep's rows count it: not the optimizer state a run's checkpoint
    keeps beside them) and bits_per_weight of a model directory (its header only, no weights read)."""
    from ..checkpoint import model_info

    info = model_info(path)
    return {"params": info["params"], "bits_per_weight": info["bits_per_weight"],
            "size_bytes": round(info["params"] * info["bits_per_weight"] / 8)}


def adapter_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def source_hash(rows: list, lines: dict, title: str = "") -> str:
    """The hash of what the report is made of: its title, each step's name, command line and result."""
    h = hashlib.sha256(json.dumps([VERSION, title]).encode())
    for row in rows:
        argv = lines[row["step"]].argv if row["step"] in lines else None
        h.update(json.dumps([row["step"], argv, row.get("result")], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _norm(path) -> str | None:
    return os.path.normpath(str(path)) if path else None


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".jsonl", ".txt", ".json"):
        name = name.removesuffix(suffix)
    return name


class _Models:
    """The models in order of first mention, keyed by (model directory, adapter directory or None)."""

    def __init__(self):
        self.rows: dict = {}

    def get(self, model, adapter=None, **fields) -> dict:
        key = (_norm(model), _norm(adapter))
        if key not in self.rows:
            self.rows[key] = {"name": None, "kind": None, "path": key[0], "adapter": key[1], "made_by": None,
                              "params": None, "size_bytes": None, "bits_per_weight": None, "perplexity": {},
                              "tasks": {}}
        row = self.rows[key]
        for k, v in fields.items():
            if row.get(k) is None:
                row[k] = v
        return row


def build_report(rows: list, lines: dict, workdir: Path, title: str = "pipeline report",
                 pipeline: str = "", describe: Describe | None = None) -> dict:
    """The report of a run: `rows` are run_pipeline's steps (with each step's result, cached ones' from the state),
    `lines` the steps' StepLines (their given options), `describe` reads a model directory (default: its header)."""
    describe = describe or describe_model
    models, pngs, runs, samples, other = _Models(), {}, [], [], []
    for row in rows:
        result, name, command = row.get("result") or {}, row["step"], row["command"]
        given = lines[name].given if name in lines else {}
        if not result:
            continue
        if command in TRAINING:
            best = f"{result.get('run', row.get('out'))}/best"
            runs.append({"step": name, "command": command, "run": result.get("run"), "method": result.get("method"),
                         "steps": result.get("steps"), "initial_loss": result.get("initial_loss"),
                         "best_val_loss": result.get("best_val_loss"), "tokens": result.get("tokens")})
            if command == "train" and given.get("init_from") is None:
                models.get(best, name=name, kind="pretrained", made_by=name, params=result.get("params"))
            elif result.get("method") in ("lora", "qlora"):
                base = given.get("model")
                models.get(base, name=Path(str(base)).name, kind="base")
                models.get(base, best, name=name, kind=f"{result['method']} adapter on {Path(str(base)).name}",
                           made_by=name)
            else:
                models.get(best, name=name, kind="full fine-tune", made_by=name, params=result.get("params"))
        elif command == "plot" and result.get("png"):
            pngs["loss curve" if "loss curve" not in pngs else f"loss curve ({name})"] = result["png"]
        elif command == "quantize sweep":
            source = models.get(result.get("model"))
            base = result.get("baseline") or {}
            if base.get("perplexity") is not None:  # the same number as `eval perplexity` (llama.cpp's windows)
                source["perplexity"].setdefault(_norm(result.get("eval")), {
                    "perplexity": base["perplexity"], "bits_per_byte": base.get("bits_per_byte"), "step": name})
            for variant in result.get("rows", []):
                r = models.get(f"{result.get('model')}#{variant['name']}", name=f"{variant['name']}",
                               kind=f"quantized ({name} of {source['name'] or result.get('model')})", made_by=name,
                               bits_per_weight=variant.get("bits_per_weight"), size_bytes=variant.get("size_bytes"))
                r["path"] = None
                r["perplexity"][_norm(result.get("eval"))] = {"perplexity": variant.get("perplexity"),
                                                              "bits_per_byte": variant.get("bits_per_byte"),
                                                              "step": name}
            png = next((f for f in result.get("files", []) if str(f).endswith(".png")), None)
            if png:
                pngs["quantization sweep" if "quantization sweep" not in pngs else f"quantization sweep ({name})"] = \
                    png
        elif command in ("merge run", "lora merge", "quantize model", "convert", "import"):
            kind = {"merge run": f"merged ({result.get('method')})", "lora merge": "adapter merged into its base",
                    "quantize model": f"quantized ({result.get('name')})", "convert": "converted",
                    "import": "imported"}[command]
            models.get(result.get("out", row.get("out")), name=name, kind=kind, made_by=name,
                       size_bytes=result.get("size_bytes"), bits_per_weight=result.get("bits_per_weight"),
                       params=result.get("params"))
        elif command == "eval perplexity":
            m = models.get(given.get("model", result.get("model")), given.get("adapter"))
            m["perplexity"][_norm(result.get("file"))] = {"perplexity": result.get("perplexity"),
                                                          "bits_per_byte": result.get("bits_per_byte"), "step": name}
        elif command == "eval task" and "accuracy" in result:
            m = models.get(given.get("model", result.get("model")), given.get("adapter"))
            m["tasks"][_stem(result.get("file", ""))] = {
                "accuracy": result["accuracy"], "correct": result.get("correct"), "total": result.get("total"),
                "step": name}
        elif command in GENERATION and "results" in result:
            kind = "retrieval" if "sources" in result else "chain-of-thought" if given.get("cot") else \
                "few-shot" if given.get("shots") else "generation"
            texts = [r.get("text", "") for r in result.get("results", [])]
            samples.append({"step": name, "kind": kind, "model": result.get("model"),
                            "question": result.get("question") or (given.get("args") or [None])[-1],
                            "text": texts[0] if texts else "", "answer": result.get("answer"),
                            "sources": result.get("sources", [])})
        else:
            other.append({"step": name, "command": command, "numbers": row.get("numbers", {})})
    for m in models.rows.values():
        _fill(m, workdir, describe)
    return {"title": title, "pipeline": pipeline, "workdir": str(workdir), "source": source_hash(rows, lines, title),
            "models": list(models.rows.values()), "pngs": pngs, "runs": runs, "samples": samples,
            "steps": [{"step": r["step"], "command": r["command"], "status": r["status"], "seconds": r["seconds"]}
                      for r in rows], "other": other}


def _fill(model: dict, workdir: Path, describe: Describe) -> None:
    """A model's name, params, size and bits per weight, read from its directory where its steps did not say."""
    model["name"] = model["name"] or Path(model["path"] or "?").name
    model["kind"] = model["kind"] or "model"
    if model["path"] is None:
        return
    try:
        if model["params"] is None or model["size_bytes"] is None or model["bits_per_weight"] is None:
            info = describe(workdir / model["path"])
            for k in ("params", "size_bytes", "bits_per_weight"):
                if model[k] is None:
                    model[k] = info.get(k)
        if model["adapter"]:
            model["adapter_bytes"] = adapter_size(workdir / model["adapter"])
    except (LbdlError, OSError, ValueError, KeyError):
        pass  # a directory gone or unreadable: its numbers stay null


# --- writing ----------------------------------------------------------------------------------------------------


def _num(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else f"{value:,}"


def _size(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def markdown(report: dict, out: Path, workdir: Path) -> str:
    """report.md: the models table (size, bits/weight, perplexity per text, score per task), runs, PNGs,
    generations and steps; image paths relative to `out`."""
    files = sorted({f for m in report["models"] for f in m["perplexity"]})
    tasks = sorted({t for m in report["models"] for t in m["tasks"]})
    lines = [f"# {report['title']}", "", f"From `{report['pipeline']}` (workdir `{report['workdir']}`).", "",
             "## Models", ""]
    head = ["model", "kind", "params", "weights", "bits/weight"] + [f"perplexity {_stem(f)}" for f in files] + \
        [f"{t} accuracy" for t in tasks]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for m in report["models"]:
        name = m["name"] + (f" (`{m['adapter']}`)" if m["adapter"] else f" (`{m['path']}`)" if m["path"] else "")
        size = _size(m["size_bytes"]) + (f" + {_size(m['adapter_bytes'])} adapter" if m.get("adapter_bytes") else "")
        cells = [name, m["kind"], _num(m["params"]), size, _num(m["bits_per_weight"], ".2f")]
        for f in files:
            p = m["perplexity"].get(f)
            cells.append("-" if p is None else _num(p["perplexity"], ".2f") +
                         (f" ({p['bits_per_byte']:.3f} bits/byte)" if p.get("bits_per_byte") is not None else ""))
        for t in tasks:
            s = m["tasks"].get(t)
            cells.append("-" if s is None else f"{s['accuracy']:.3f} ({s['correct']}/{s['total']})")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if files:
        lines += ["", "Perplexity texts: " + ", ".join(f"`{f}`" for f in files) + " (perplexities over different "
                  "tokenizers are not comparable; bits per byte are)."]
    if report["runs"]:
        lines += ["", "## Training runs", "", "| step | command | steps | initial loss | best val loss | tokens |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in report["runs"]:
            lines.append(f"| {r['step']} | {r['command']}{' ' + r['method'] if r.get('method') else ''} | "
                         f"{_num(r['steps'])} | {_num(r['initial_loss'])} | {_num(r['best_val_loss'])} | "
                         f"{_num(r['tokens'])} |")
    if report["pngs"]:
        lines += ["", "## Figures", ""]
        for label, path in report["pngs"].items():
            rel = Path(os.path.relpath(workdir / path, out)).as_posix()
            lines += [f"{label} (`{path}`):", "", f"![{label}]({rel})", ""]
    if report["samples"]:
        lines += ["", "## Generations", ""]
        for s in report["samples"]:
            lines += [f"- **{s['step']}** ({s['kind']}): {_cell(s['question'] or '')} -> "
                      f"`{_cell(s['text'])}`" + (f" (answer {s['answer']})" if s.get("answer") else "") +
                      (f"; sources {', '.join(s['sources'])}" if s["sources"] else "")]
    lines += ["", "## Steps (the run that wrote this report)", "", "| step | command | status | seconds |",
              "|---|---|---|---:|"]
    lines += [f"| {s['step']} | {s['command']} | {s['status']} | {s['seconds']:.1f} |" for s in report["steps"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path, workdir: Path) -> list[str]:
    """report.md and report.json into `out`, atomically (the directory replaced as a whole)."""
    with atomic_dir(out, force=True) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown(report, out, workdir), encoding="utf-8")
    return [str(out / f) for f in FILES]


def unchanged(out: Path, rows: list, lines: dict, title: str = "") -> bool:
    """The report in `out` was made from these same results (and report.md is there)."""
    try:
        made = json.loads((out / "report.json").read_text(encoding="utf-8")).get("source")
        return made == source_hash(rows, lines, title) and (out / "report.md").is_file()
    except (OSError, ValueError, AttributeError):
        return False
