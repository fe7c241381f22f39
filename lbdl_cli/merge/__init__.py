"""Model merging (LBDL 8.4): `methods` (the merge methods as tensor functions and their registry), `config`
(MergeConfig, torch-free), `driver` (the streaming merge of model and adapter directories), `search` (merge search
by CMA-ES, scored on task files). The torch modules load on first use, so that importing the package stays
torch-free."""

from __future__ import annotations

import importlib

from .config import MERGE_CONFIG, METHOD_NAMES, MergeConfig, MergeFlags, MergeModel, Slice, read_merge_config

_LAZY = {
    "methods": ("DOT_THRESHOLD", "METHODS", "Method", "Param", "dare_linear", "dare_ties", "describe",
                "drop_generator", "linear", "merge_tensors", "passthrough", "slerp", "sparsify", "task_arithmetic",
                "task_merge", "ties"),
    "driver": ("merge",),
    "search": ("SearchConfig", "search"),
    "score": ("score_dir",),
}

__all__ = ["MERGE_CONFIG", "METHOD_NAMES", "MergeConfig", "MergeFlags", "MergeModel", "Slice", "read_merge_config",
           *(name for names in _LAZY.values() for name in names)]


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
