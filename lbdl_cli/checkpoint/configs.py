"""The model directory's names and the options of the commands that make or convert one; torch-free, so that
the CLI builds its flags from them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DTYPE_CHOICES, Config, dtype_setting, setting

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "ckpt.pt")
STORAGE_DTYPES = ("float32", "bfloat16")
EXPORT_FORMATS = ("hf",)


@dataclass(frozen=True)
class InitConfig(Config):
    """`lbdl init`: a fresh model from a preset."""

    RENAMED = {"block_size": "context", "dtype": "weights_dtype"}
    preset: str | None = setting(None, "Model preset (see `lbdl presets`); required.")
    vocab_size: int | None = setting(None, "Vocabulary size (none: the preset's).", low=1, high=1 << 24)
    context: int | None = setting(None, "Context length in tokens, the model's block_size (none: the preset's).",
                                  low=1, high=1 << 20)
    seed: int = setting(1337, "Seed of the initialisation and of the check on random tokens.")
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


@dataclass(frozen=True)
class ExportConfig(Config):
    """`lbdl export`."""

    to: str = setting("hf", "Target format: hf (a transformers directory).", choices=EXPORT_FORMATS)
