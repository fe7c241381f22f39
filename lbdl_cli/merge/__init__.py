"""Model merging (LBDL 8.4, issue #14). `methods`: the merge methods as tensor functions and their registry,
loaded on first use (torch), so that importing the package stays torch-free."""

from __future__ import annotations

import importlib

_METHODS = ("DOT_THRESHOLD", "METHODS", "Method", "Param", "dare_linear", "dare_ties", "describe", "drop_generator",
            "linear", "merge_tensors", "passthrough", "slerp", "sparsify", "task_arithmetic", "task_merge", "ties")

__all__ = [*_METHODS]


def __getattr__(name: str):
    if name in _METHODS:
        value = getattr(importlib.import_module(".methods", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
