"""Shared fixtures: tiny models and an in-process CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lbdl_cli import kernels
from lbdl_cli.model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SEP = "<|sep|>"  # the user special token of the shared tokenizer

TINY_GPT2 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
TINY_LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu",
                  norm="rmsnorm", positions="rope", bias=False, tie_embeddings=False)


def free_port() -> int:
    """A TCP port no one listens on now (for torchrun's rendezvous), so that two test runs never collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    base = dict(TINY_LLAMA) if overrides.pop("family", "gpt2") == "llama" else dict(TINY_GPT2)
    return GPT(ModelConfig(**{**base, **overrides})).eval()


def random_hf_model(arch: str):
    """A freshly initialised (seed 0) Hugging Face GPT-2 or Llama (GQA) of vocabulary 113 and context 64."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=113, n_positions=64, n_embd=48,
                                                                    n_layer=2, n_head=4))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=113, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def imported_hf_model(arch: str, tmp_path, noise: float):
    """(transformers model, the same weights imported into lbdl): a random Hugging Face GPT-2 or
    Llama (GQA) of vocabulary 113 and context 64, its weights shaken by `noise` so that its
    predictions are not flat, saved with save_pretrained and loaded back through `lbdl import`."""
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.checkpoint.hf import import_hf

    hf = random_hf_model(arch)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * noise)
    hf.eval().save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "lbdl")
    model, _ = load_model(tmp_path / "lbdl")
    return hf, model


def assert_round_trips(config) -> None:
    """A config comes back equal from its dict and from its TOML (what a pipeline step is made of)."""
    cls = type(config)
    assert cls.from_dict(config.to_dict()) == config
    assert cls.from_toml(config.to_toml()) == config


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __iter__(self):  # code, out, err = cli(...)
        return iter((self.code, self.out, self.err))

    def json(self):
        import json

        return json.loads(self.out.strip().splitlines()[-1])


def run_lbdl(args, capsys, stdin: bytes | str | None = None) -> CliResult:
    """Run `lbdl ARGS...` in-process, with `stdin` as standard input if given; exit code, stdout and stderr."""
    import io
    import sys

    from lbdl_cli.cli import main

    capsys.readouterr()
    saved = sys.stdin
    if stdin is not None:
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = saved
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


@pytest.fixture
def cli(capsys):
    """The one CLI runner of the tests: `cli(*args, stdin=None)` runs `lbdl ARGS...` in-process and returns
    the exit code, stdout and stderr (and .json(), the last line parsed)."""
    return lambda *args, stdin=None: run_lbdl(args, capsys, stdin)


# --- shared fixtures: the probe's cache kept private, a small tokenizer, a tiny model directory -----------------


@pytest.fixture(autouse=True)
def private_kernel_cache(tmp_path_factory, monkeypatch):
    """The machine probe (consulted for bfloat16 and quantized models) never reads or writes the user's cache."""
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "lbdl-cache"))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A small BPE tokenizer (400 ids, one user special token) trained on tinyshakespeare."""
    from tokenizer import train

    root = tmp_path_factory.mktemp("tok")
    (root / "s.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:100_000])
    train([root / "s.txt"], vocab_size=400, out=root / "tok", special_tokens=(SEP,))
    return root / "tok"


@pytest.fixture(scope="session")
def tok(tok_dir):
    from tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def model_dir(tok_dir, tmp_path_factory):
    """A tiny random GPT (context 64) with the tokenizer: a complete model directory."""
    out = tmp_path_factory.mktemp("m") / "model"
    from lbdl_cli.checkpoint import save_model

    save_model(tiny_model(vocab_size=400, block_size=64), out, tokenizer=tok_dir / "tokenizer.model")
    return out
