"""The import layers of docs/DESIGN.md, held: every import (module level or inside a function) goes up the
table, never across or down; tokenizer/ and quant/ take only layer-0 leaves of lbdl_cli; nothing imports cli.
And every name a package exports in __all__ resolves."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lbdl_cli", "tokenizer", "quant")
STANDALONE = ("tokenizer", "quant")


def layer_table(design: Path) -> dict[str, int]:
    """{unit: layer} from the module table: `model.py` -> "model", `sample/` -> "sample", `tokenizer/` ->
    "tokenizer" (a top-level package), `__init__.py` -> "" (lbdl_cli's own __init__)."""
    table = {}
    for line in design.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        for name in re.findall(r"`([^`]+)`", m.group(2)):
            unit = name.removesuffix("/").removesuffix(".py")
            table["" if unit == "__init__" else unit] = int(m.group(1))
    return table


def unit_of(module: str) -> str | None:
    """The table's unit of a dotted module name: lbdl_cli.sample.decode -> "sample", quant.linear -> "quant"."""
    parts = module.split(".")
    if parts[0] in STANDALONE:
        return parts[0]
    if parts[0] == "lbdl_cli":
        unit = parts[1] if len(parts) > 1 else ""
        return "cli" if unit == "__main__" else unit  # `python -m lbdl_cli` is the CLI
    return None  # outside the project: torch, typer, ...


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative ones resolved, `from pkg import sub` as
    pkg.sub when sub is a module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_module = any((root / Path(*sub.split("."))).with_suffix(s).exists() for s in (".py",)) or \
                    (root / Path(*sub.split(".")) / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else target))
    return found


def violations(root: Path, table: dict[str, int]) -> list[str]:
    """Every import in the project's packages under `root` that breaks the layers."""
    out: list[str] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "presets" in path.parts:
                continue
            name = module_name(path, root)
            unit = unit_of(name)
            where = f"{path.relative_to(root)}"
            if unit not in table:
                out.append(f"{where}: module {unit or name!r} has no row in the DESIGN.md table")
                continue
            for line, target in imports_of(path, root):
                t = unit_of(target)
                if t is None or t == unit:
                    continue
                if t == "cli":
                    out.append(f"{where}:{line}: imports {target}; nothing imports the CLI")
                elif t not in table:
                    out.append(f"{where}:{line}: imports {target}, which has no row in the DESIGN.md table")
                elif unit in STANDALONE and table[t] != 0:
                    out.append(f"{where}:{line}: {unit}/ imports {target}; it may take only layer-0 leaves of lbdl_cli")
                elif table[t] >= table[unit] and not table[t] == table[unit] == 0:  # leaves may use errors
                    how = "its own layer" if table[t] == table[unit] else "a layer below"
                    out.append(f"{where}:{line}: {unit} (layer {table[unit]}) imports {target} "
                               f"(layer {table[t]}, {how}); imports go up the table only")
    return list(dict.fromkeys(out))


def test_every_import_goes_up_the_table():
    table = layer_table(ROOT / "docs" / "DESIGN.md")
    assert table["errors"] == 0 and table["cli"] == 10
    assert violations(ROOT, table) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


TABLE = {"": 0, "errors": 0, "tokenizer": 1, "quant": 1, "model": 2, "checkpoint": 3, "sample": 5, "cli": 10}


@pytest.mark.parametrize("files, expected", [
    ({"lbdl_cli/model.py": "def f():\n    from .checkpoint import load\n", "lbdl_cli/checkpoint/__init__.py": ""},
     "model (layer 2) imports lbdl_cli.checkpoint (layer 3, a layer below)"),
    ({"lbdl_cli/model.py": "import lbdl_cli.sample.decode\n", "lbdl_cli/sample/decode.py": ""},
     "model (layer 2) imports lbdl_cli.sample.decode"),
    ({"quant/linear.py": "from lbdl_cli.model import GPT\n", "lbdl_cli/model.py": ""},
     "quant/ imports lbdl_cli.model; it may take only layer-0 leaves"),
    ({"lbdl_cli/sample/x.py": "from ..cli import output\n", "lbdl_cli/cli/output.py": ""},
     "nothing imports the CLI"),
    ({"lbdl_cli/newthing.py": ""}, "module 'newthing' has no row"),
    ({"tokenizer/core.py": "from quant import formats\n", "quant/formats.py": ""},
     "tokenizer/ imports quant.formats"),
])
def test_the_checker_catches_each_kind_of_breach(tmp_path, files, expected):
    found = violations(_tree(tmp_path, files), TABLE)
    assert any(expected in v for v in found), found


def test_the_checker_passes_imports_that_go_up(tmp_path):
    files = {"lbdl_cli/sample/decode.py": "from ..model import GPT\nfrom ..errors import E\nfrom . import text\n",
             "lbdl_cli/sample/text.py": "", "lbdl_cli/model.py": "import torch\nfrom tokenizer import core\n",
             "tokenizer/core.py": "from lbdl_cli.errors import DataError\n", "lbdl_cli/errors.py": ""}
    assert violations(_tree(tmp_path, files), TABLE) == []


@pytest.mark.parametrize("package", ["lbdl_cli", "tokenizer", "quant", "lbdl_cli.sample", "lbdl_cli.train",
                                     "lbdl_cli.checkpoint"])
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        assert getattr(module, name) is not None, f"{package}.{name}"
