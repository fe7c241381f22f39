"""The model directory: presets, atomic save, safe load, metadata, Hugging Face import/export.

A model is a directory holding `config.json` (format_version, the model
config, and the tokenizer / quantization sections where relevant),
`model.safetensors` and `tokenizer.model`. Weights are read with safetensors
only: nothing here ever unpickles.

    from lbdl_cli.checkpoint import load_model, save_model
    model, config = load_model("run/best")

The package itself is light: its names (`checkpoint.directory`: torch and
safetensors) load on first use, and the commands' configs
(`checkpoint.configs`) import no torch, so the CLI can build its flags from
them at start-up.
"""

from __future__ import annotations

import importlib

from .configs import (
    CONFIG_FILE,
    EXPORT_FORMATS,
    FORMAT_VERSION,
    PICKLE_FILES,
    STORAGE_DTYPES,
    WEIGHTS_FILE,
    ConvertConfig,
    ExportConfig,
    ImportConfig,
    InitConfig,
    default_model_dir,
    preset_names,
    read_config,
)

_DIRECTORY = (
    "DTYPES", "SAFETENSORS_DTYPES", "TOKENIZER_FILE", "atomic_dir", "check_tensors", "convert_dtype", "create_model",
    "dir_size", "load_model", "load_preset", "model_config", "model_info", "model_tokenizer", "open_safetensors",
    "parse_dtype", "save_model", "save_tensors", "tensor_dtypes", "tensor_shapes",
    "weights_path",
    "write_json", "write_model",
)

__all__ = [  # the light names, then the directory's
    "CONFIG_FILE", "EXPORT_FORMATS", "FORMAT_VERSION", "PICKLE_FILES", "STORAGE_DTYPES", "WEIGHTS_FILE",
    "ConvertConfig", "ExportConfig", "ImportConfig", "InitConfig", "default_model_dir", "preset_names",
    "read_config", *_DIRECTORY,
]


def __getattr__(name: str):
    if name in _DIRECTORY:
        value = getattr(importlib.import_module(".directory", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
