"""Pretraining's parts (and full fine-tuning's, --init-from): a model from a preset or a model directory,
token windows of the training shard, fixed validation windows, a full model directory per checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import TOKENIZER_FILE, load_model, load_preset
from ..data import WindowSampler, check_tokenizer, eval_batches, load_shards, unigram_loss
from ..errors import ConfigError, DataError
from ..model import GPT
from .config import TrainConfig
from .distributed import Dist
from .parts import Parts
from .state import ModelDirectories


def build_model(cfg: TrainConfig, meta: dict, data_dir: Path) -> tuple[GPT, dict]:
    """A fresh model from the preset (vocabulary from the data), or the model to fine-tune; and the config.json
    sections that its checkpoints carry over."""
    if cfg.init_from:
        model, config = load_model(cfg.init_from, dtype=torch.float32)
        if not (Path(cfg.init_from) / TOKENIZER_FILE).is_file():
            raise DataError(f"{cfg.init_from} has no {TOKENIZER_FILE}; fine-tuning needs the model's tokenizer")
        check_tokenizer(meta, cfg.init_from, data_dir)
        if model.config.vocab_size < meta["vocab_size"]:
            raise DataError(f"{cfg.init_from} has {model.config.vocab_size} tokens, fewer than the data's "
                            f"{meta['vocab_size']}")
        sections = {k: config[k] for k in ("tokenizer",) if k in config}
        if cfg.dropout is not None:
            model.set_dropout(cfg.dropout)
        return model.train(), sections
    if not cfg.preset:
        raise ConfigError("give --preset NAME to pretrain a new model or --init-from MODEL to fine-tune one")
    model_cfg, _ = load_preset(cfg.preset)
    changes = {"vocab_size": meta["vocab_size"]}
    if cfg.dropout is not None:
        changes["dropout"] = cfg.dropout
    torch.manual_seed(cfg.seed)
    return GPT(model_cfg.replace(**changes)), {}


def pretraining_parts(cfg: TrainConfig, dist: Dist) -> Parts:
    """The parts of `lbdl train`: the shards of --data, the model of --preset or --init-from."""
    if not cfg.data:
        raise ConfigError("give --data SHARDS (a directory made by `lbdl data prepare`)")
    data_dir = Path(cfg.data)
    train_tokens, val_tokens, meta = load_shards(data_dir)
    tokenizer = data_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise DataError(f"{data_dir} has no {TOKENIZER_FILE}; re-run `lbdl data prepare`")
    check_tokenizer(meta, tokenizer, data_dir)
    model, sections = build_model(cfg, meta, data_dir)
    block_size = model.config.block_size
    context = cfg.context if cfg.context is not None else block_size
    if context > block_size:
        raise ConfigError(f"--context {context} is longer than the model's block_size {block_size}; "
                          f"use --context {block_size} or less")
    sampler = WindowSampler(train_tokens, context, cfg.seed)
    # the validation set is fixed by the global batch; each rank scores its slice of every batch
    B, r = cfg.batch_size, dist.rank
    val = [(x[r * B:(r + 1) * B], y[r * B:(r + 1) * B])
           for x, y in eval_batches(val_tokens, context, B * dist.world, cfg.eval_batches, cfg.seed)]
    return Parts(model=model, sampler=sampler, n_samples=sampler.n_windows,
                 samples=f"windows of the training shard at context {context}", val=val, context=context,
                 checkpoints=ModelDirectories(tokenizer, sections, str(data_dir)),
                 baseline=lambda: unigram_loss(train_tokens, val_tokens, meta["vocab_size"]),
                 fresh=not cfg.init_from)
