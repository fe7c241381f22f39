"""LoRA adapters (LBDL 8.3; Hu et al. 2021) and their PEFT directory format: `adapters` (torch) and `config`
(LoRAConfig and the file names, torch-free, so the CLI builds its flags without importing torch)."""

from __future__ import annotations

import importlib

from .config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ALL_LINEAR, ATTENTION, INITS, PEFT_PREFIX, LoRAConfig, lora_scale

_ADAPTERS = (
    "LoRALinear", "adapter_deltas", "adapter_layers", "apply_lora", "base_sha256", "count_params", "file_sha256",
    "hf_modules", "linear_layers",
    "load_adapter", "lora_modules", "lora_state_dict", "merge_adapter_dir", "merge_lora", "read_adapter", "remove_lora",
    "resolve_targets", "save_adapter", "set_lora_state", "unmerge_lora", "write_adapter",
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ALL_LINEAR", "ATTENTION", "INITS", "PEFT_PREFIX", "LoRAConfig",
           "lora_scale", *_ADAPTERS]


def __getattr__(name: str):
    if name in _ADAPTERS:
        value = getattr(importlib.import_module(".adapters", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
