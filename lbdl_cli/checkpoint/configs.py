"""The model directory's names and the options of the commands that make or convert one; torch-free, so that
the CLI builds its flags from them without importing torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import DTYPE_CHOICES, MAX_SEED, MAX_TOKENS, MAX_VOCAB, Config, dtype_setting, setting
from ..errors import CheckpointError
from ..files import read_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "ckpt.pt")
STORAGE_DTYPES = ("float32", "bfloat16")
EXPORT_FORMATS = ("hf", "gguf")


@dataclass(frozen=True)
class InitConfig(Config):
    """`lbdl init`: a fresh model from a preset."""

    RENAMED = {"block_size": "context", "dtype": "weights_dtype"}
    preset: str | None = setting(None, "Model preset (see `lbdl presets`); required.", metavar="PRESET")
    vocab_size: int | None = setting(None, "Vocabulary size (none: the preset's).", low=1, high=MAX_VOCAB)
    context: int | None = setting(None, "Context length in tokens, the model's block_size (none: the preset's).",
                                  low=1, high=MAX_TOKENS)
    seed: int = setting(1337, "Seed of the initialisation and of the check on random tokens.", low=0, high=MAX_SEED)
    weights_dtype: str = dtype_setting("Stored dtype of the weights: auto (float32) | float32 | bfloat16.")


@dataclass(frozen=True)
class ConvertConfig(Config):
    """`lbdl convert`: the dtype the weights are stored in."""

    RENAMED = {"dtype": "weights_dtype"}
    weights_dtype: str = setting("bfloat16", "Stored dtype of the weights (bfloat16 halves the size).",
                                 choices=STORAGE_DTYPES)


@dataclass(frozen=True)
class ImportConfig(Config):
    """`lbdl import`."""

    RENAMED = {"dtype": "weights_dtype"}
    weights_dtype: str = setting("auto", "Stored dtype of the weights: auto (as the checkpoint has it; float16 "
                                         "becomes float32) | float32 | bfloat16.", choices=DTYPE_CHOICES)
    dequantize: bool = setting(False, "GGUF only: dequantize the tensors whose type lbdl has no blocks for "
                                      "(Q6_K, IQ*...) to floats instead of refusing the file.")


@dataclass(frozen=True)
class ExportConfig(Config):
    """`lbdl export`."""

    to: str = setting("hf", "Target format: hf (a transformers directory) | gguf (one llama.cpp file).",
                      choices=EXPORT_FORMATS)
    weights_dtype: str = setting("auto", "Dtype of the float weights: auto (as stored) | float32 | bfloat16 "
                                         "(quantized blocks are written as they are).", choices=DTYPE_CHOICES)


# --- presets, the bundled default model, a directory's config.json: no torch needed ----------------


def _presets_root():
    """models/ as installed (the data package lbdl_cli.presets), or in a checkout run in place."""
    try:
        return resources.files("lbdl_cli.presets")
    except ModuleNotFoundError:  # `python -m lbdl_cli` from an uninstalled checkout
        return Path(__file__).resolve().parents[2] / "models"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _presets_root().iterdir() if p.name.endswith(".json"))


def default_model_dir() -> Path:
    """The bundled default model (a directory inside the installed package)."""
    path = Path(str(_presets_root() / "default"))
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"the bundled default model is missing from {path}; reinstall lbdl or name a model "
                              f"directory")
    return path


def read_config(dir: str | os.PathLike) -> dict:
    """config.json of a model directory, its format version checked."""
    dir = Path(dir)
    if not dir.exists():
        raise CheckpointError(f"model directory {dir} does not exist")
    if not dir.is_dir():
        raise CheckpointError(f"{dir} is not a model directory (expected a directory with {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    path = dir / CONFIG_FILE
    if not path.is_file():
        hf_dir = (dir / "model.safetensors.index.json").exists()
        hint = " (it looks like a Hugging Face directory: run `lbdl import` first)" if hf_dir else ""
        raise CheckpointError(f"{dir} has no {CONFIG_FILE}; it is not an lbdl model directory{hint}")
    config = read_json(path, error=CheckpointError, kind=object)
    if not isinstance(config, dict) or "model" not in config:
        hf_config = isinstance(config, dict) and "architectures" in config
        hint = " (it looks like a Hugging Face config: run `lbdl import` first)" if hf_config else ""
        raise CheckpointError(f"{path} has no 'model' section; it is not an lbdl model directory{hint}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this lbdl reads format_version {FORMAT_VERSION} (upgrade lbdl "
            f"or re-save the model)"
        )
    return config
