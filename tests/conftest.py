"""Shared fixtures: tiny models and an in-process CLI runner."""

from __future__ import annotations

import pytest
import torch

from lbdl_cli.model import GPT, ModelConfig

TINY_GPT2 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
TINY_LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu",
                  norm="rmsnorm", positions="rope", bias=False, tie_embeddings=False)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    base = dict(TINY_LLAMA) if overrides.pop("family", "gpt2") == "llama" else dict(TINY_GPT2)
    return GPT(ModelConfig(**{**base, **overrides})).eval()


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def json(self):
        import json

        return json.loads(self.out.strip().splitlines()[-1])


def run_lbdl(args, capsys) -> CliResult:
    """Run `lbdl ARGS...` in-process; exit code, stdout and stderr."""
    from lbdl_cli.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


@pytest.fixture
def cli(capsys):
    """Run `lbdl ARGS...` in-process; returns exit code, stdout and stderr."""
    return lambda *args: run_lbdl(args, capsys)
