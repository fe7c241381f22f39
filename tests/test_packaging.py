"""The presets and the bundled default model travel with a plain (non-editable) install."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_models_folder(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("lbdl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (ROOT / "models").glob("*.json")}
    assert presets and {f"lbdl_cli/presets/{p}" for p in presets} <= names
    for path in (ROOT / "models").glob("*/*"):  # the bundled default model, once there is one
        assert f"lbdl_cli/presets/{path.parent.name}/{path.name}" in names
    for top in ("lbdl_cli", "tokenizer", "quant"):  # every module of every package
        for module in (ROOT / top).rglob("*.py"):
            assert str(module.relative_to(ROOT)) in names, module


def test_presets_are_found_from_an_uninstalled_checkout(tmp_path):
    """`python -m lbdl_cli` with the checkout first on sys.path, as from the repository root."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import lbdl_cli.checkpoint as c; "
            "print(c.preset_names(), c.default_model_dir().name)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout
    assert "nano" in out and "llama-tiny" in out and out.strip().endswith("default")
