"""Training: pretraining from a preset and full fine-tuning (`lbdl train`), on one loop that other kinds of
training reuse through its parts (parts.py).

`config` is light (the CLI reads it to build its flags); the loop, which
imports torch, loads on first use.
"""

from .config import TrainConfig, resolve

_LAZY = {"Trainer": "loop", "train": "loop", "resume_config": "loop", "Interrupted": "loop", "lr_find": "lr_find",
         "Parts": "parts", "pretraining_parts": "pretrain"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = ["TrainConfig", "resolve", *sorted(_LAZY)]
