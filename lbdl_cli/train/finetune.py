"""Fine-tuning a model on instruction records (LBDL 8.3), on the loop of `lbdl train`: every weight (full), LoRA
adapters on the frozen base, or QLoRA (the frozen base quantized, each layer's weight dequantized in the forward
and again in the backward; the adapters and their optimizer state float32).

    result = finetune(FinetuneConfig(init_from="models/default", data="data/tasks/facts-train.jsonl",
                                     out="runs/facts", method="lora"))

A LoRA run's checkpoints (run/best, run/last) are PEFT adapter directories, with the optimizer and trainer state
beside them; a full run's are model directories, as `lbdl train`'s. `objective="contrastive"` trains an embedder
on {query, passage} pairs instead (contrastive.py); its checkpoints record how to embed with them: an "embedding"
section ({"objective", "pooling", "temperature"}) in training.json (LoRA) or config.json (full), which
rag.embed.recorded_pooling reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import TOKENIZER_FILE, load_model, model_tokenizer, save_tensors, write_json
from ..errors import CheckpointError, ConfigError
from ..lora import apply_lora, lora_state_dict, set_lora_state, write_adapter
from ..progress import Progress
from ..records import RecordSampler, load_records, val_batches
from . import distributed, state
from .config import FinetuneConfig
from .contrastive import embedding_record, pair_parts
from .distributed import Dist
from .parts import Parts

LORA_STATE = "lora_state.safetensors"  # the adapters by lbdl's module names: what a resume copies back


def finetune_parts(cfg: FinetuneConfig, dist: Dist) -> Parts:
    """The parts of `lbdl finetune`: the records of --data (pairs with --objective contrastive), the model of MODEL
    (quantized for QLoRA), adapted."""
    if not cfg.init_from or not cfg.data:
        raise ConfigError("give the model to fine-tune (MODEL) and its records (DATA, a JSONL file)")
    base_dir = Path(cfg.init_from)
    model, config = load_model(base_dir, dtype=torch.float32)
    prequantized = "quantization" in config  # `lbdl quantize`'s output: QLoRA's base as it is, on disk and in memory
    if prequantized and cfg.method != "qlora":
        raise CheckpointError(f"{base_dir} is quantized: fine-tune it with --method qlora, or fine-tune its "
                              f"unquantized model")
    tok = model_tokenizer(base_dir, config)
    block_size = model.config.block_size
    context = cfg.context if cfg.context is not None else block_size
    if context > block_size:
        raise ConfigError(f"--context {context} is longer than the model's block_size {block_size}; "
                          f"use --context {block_size} or less")
    if cfg.records.val_fraction == 0:
        raise ConfigError("records val_fraction is 0: fine-tuning needs validation records (evaluation, best/, "
                          "early stopping); give a val_fraction above 0")
    contrastive = cfg.objective == "contrastive"
    records = None if contrastive else load_records(cfg.data, tok, context, cfg.records)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    if cfg.method == "full":
        sections = {"embedding": embedding_record(cfg)} if contrastive else {}  # config.json's
        checkpoints = state.ModelDirectories(base_dir / TOKENIZER_FILE, sections, str(cfg.data))
    else:
        if cfg.method == "qlora" and not prequantized:
            quantize_base(model, cfg.quant_type)
        model.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # A's initialisation: the run's seed, as pretraining's weights
        apply_lora(model, cfg.lora)
        qtype = config["quantization"]["type"] if prequantized else cfg.quant_type if cfg.method == "qlora" else None
        checkpoints = AdapterCheckpoints(cfg, base_dir, qtype)
    if contrastive:
        return pair_parts(cfg, dist, model, tok, context, checkpoints)
    sampler = RecordSampler(records.train, cfg.seed)
    B, r = cfg.batch_size, dist.rank
    val = [(x[r * B:(r + 1) * B], y[r * B:(r + 1) * B])
           for x, y in val_batches(records.val, B * dist.world, cfg.eval_batches, cfg.seed)]
    return Parts(model=model, sampler=sampler, n_samples=sampler.n_samples,
                 samples=f"rows of packed records at context {context}", val=val, context=context,
                 checkpoints=checkpoints)


def quantize_base(model, qtype: str) -> None:
    """QLoRA's base: every matrix of the blocks in `qtype`; the embeddings and the head stay as they are."""
    from quant.linear import quantize_model

    types = {f"{name}.weight": qtype for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")}
    quantize_model(model, types)
    with torch.no_grad():  # the float tensors left (embeddings, norms, biases) in memory of their own: load_model's
        for p in model.parameters():  # are views of the mapped weights file, which would keep every page read
            p.data = p.data.clone()   # while quantizing (the whole float model) resident


@dataclass
class AdapterCheckpoints:
    """LoRA's checkpoints: each a PEFT adapter directory (usable as it is: generate/eval --adapter, lora merge)
    plus the adapters by lbdl's names, the optimizer and the trainer state."""

    cfg: FinetuneConfig
    base_dir: Path
    base_quantization: str | None  # QLoRA: the type the frozen base was trained in

    def save(self, run: Path, step: int, model, optimizer, trainer: dict, rng: dict, training: dict, best: bool,
             write: bool) -> None:
        _, optim_state = distributed.full_state(model, optimizer)
        if write:
            def write_state(d: Path) -> None:
                write_adapter(model, self.cfg.lora, d, self.base_dir, self.base_quantization)
                save_tensors({k: v.contiguous() for k, v in lora_state_dict(model).items()}, d / LORA_STATE)
                extra = {"embedding": embedding_record(self.cfg)} if self.cfg.objective == "contrastive" else {}
                write_json(d / "training.json", {**training, "data": str(self.cfg.data), "method": self.cfg.method,
                                                 "objective": self.cfg.objective,
                                                 "records": self.cfg.records.to_dict(), **extra})  # chat template

            state.save_checkpoint(run, step, write_state, optim_state, trainer, rng, best)

    def load(self, run: Path, model, optimizer) -> tuple[dict, dict]:
        last = (run / "last").resolve()
        if not (last / LORA_STATE).is_file():
            raise CheckpointError(f"{last} has no {LORA_STATE}; it is not a LoRA checkpoint of this run")
        set_lora_state(model, load_file(str(last / LORA_STATE)))
        trainer, optim_state, rng = state.load_trainer_state(last)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        return trainer, rng


def finetune(cfg: FinetuneConfig, progress: Progress | None = None, resume: bool = False,
             force: bool = False) -> dict:
    """Run a fine-tuning job on the training loop."""
    from .loop import train

    result = train(cfg, progress, resume=resume, force=force, parts=finetune_parts)
    if cfg.objective == "contrastive":
        result = {**result, "objective": cfg.objective, "pooling": cfg.pooling}
    return result
