"""Training: pretraining from a preset and full fine-tuning (`lbdl train`).

`config` is light (the CLI reads it to build its flags); the loop, which
imports torch, loads on first use.
"""

from .config import TrainConfig, resolve

_LAZY = {"Trainer", "train", "resume_config", "Interrupted", "lr_find"}


def __getattr__(name):
    if name in _LAZY:
        from . import loop, lr_find as _lr_find

        return _lr_find.lr_find if name == "lr_find" else getattr(loop, name)
    raise AttributeError(name)


__all__ = ["TrainConfig", "resolve", *sorted(_LAZY)]
