"""The merge driver: model directories (or LoRA adapters over the base) in, one model directory out, one tensor
at a time (LBDL 8.4; mergekit's streaming).

Every input is read a tensor at a time (checkpoint.stream.TensorReader: positioned reads, nothing mapped) and
the output is written a tensor at a time (SafetensorsWriter), so the peak memory grows with the largest tensor,
not with the model: its (inputs + 1) copies, plus the method's temporaries (TIES's sort of the stacked task
vectors takes several times more; docs/BENCHMARKS.md measures it). An adapter input is the base plus its
s B A (adapter_deltas): a task vector without a full fine-tune.

    result = merge(MergeConfig(method="ties", base="models/default", models=(MergeModel("runs/a/best"),
                               MergeModel("runs/b/best")), parameters={"density": 0.5}), "merged")
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir, check_out
from ..checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, model_config, read_config, write_json
from ..checkpoint.stream import SafetensorsWriter, TensorReader
from ..errors import CheckpointError, ConfigError
from ..lora import ADAPTER_CONFIG
from ..progress import Progress, report
from .config import MERGE_CONFIG, MergeConfig, model_values, tensor_parameters
from .methods import METHODS, merge_tensors


@dataclass
class Source:
    """One input directory: a model (its config.json, a reader) or an adapter (its task vector over the base)."""

    path: str
    config: dict | None = None  # a model's config.json
    reader: TensorReader | None = None
    deltas: dict[str, torch.Tensor] | None = None  # an adapter's {weight name: s B A}
    base: "Source | None" = None
    last: tuple = ()  # (name, tensor) of the last read: the base is read by every adapter over it

    def get(self, name: str, dequantize: bool) -> torch.Tensor:
        if self.last and self.last[0] == name:
            return self.last[1]
        t = self._read(name, dequantize)
        self.last = (name, t)
        return t

    def _read(self, name: str, dequantize: bool) -> torch.Tensor:
        if self.deltas is not None:
            t = self.base.get(name, dequantize)
            return t + self.deltas[name].to(t.dtype) if name in self.deltas else t
        t = self.reader.get(name)
        qtype = quantized_types(self.config).get(name)
        if qtype is not None:  # only with --dequantize (refused before otherwise)
            from quant.formats import dequantize

            t = dequantize(t, qtype, dtype=torch.float32)
        return t


def quantized_types(config: dict | None) -> dict[str, str]:
    section = (config or {}).get("quantization") or {}
    return dict(section.get("tensors", {}))


def open_model(path: str, dequantize: bool) -> Source:
    if (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / CONFIG_FILE).is_file():
        return Source(path)  # an adapter: opened against the base (open_sources)
    config = read_config(Path(path))
    if quantized_types(config) and not dequantize:
        raise CheckpointError(f"{path} is quantized ({config['quantization'].get('type')}); merging needs float "
                              f"weights: add --dequantize, or merge the unquantized models")
    return Source(path, config, TensorReader(Path(path) / WEIGHTS_FILE))


def open_sources(cfg: MergeConfig) -> tuple[dict[str, Source], Source]:
    """{path: Source} of every input, and the reference model (the base, else the first model directory) whose
    architecture, tokenizer, tensor names and dtypes the others must match."""
    sources = {p: open_model(p, cfg.dequantize) for p in cfg.inputs}
    models = [s for s in sources.values() if s.config is not None]
    if cfg.base and sources[cfg.base].config is None:
        raise ConfigError(f"the base {cfg.base} is an adapter directory; give the model it adapts as --base")
    if not models:
        raise ConfigError("every input is an adapter: give the model they adapt as --base")
    ref = sources[cfg.base] if cfg.base else models[0]
    check_compatible(ref, models, passthrough=cfg.method == "passthrough")
    for s in sources.values():
        if s.config is None:  # an adapter: its task vector against the base's layer names and shapes
            if not cfg.base:
                raise ConfigError(f"{s.path} is a LoRA adapter: give the model it adapts as --base")
            from ..lora import adapter_deltas
            from ..model import GPT

            with torch.device("meta"):
                skeleton = GPT(model_config(ref.config, Path(cfg.base) / CONFIG_FILE))
            s.deltas, s.base = adapter_deltas(skeleton, s.path, base_dir=cfg.base), ref
    return sources, ref


def check_compatible(ref: Source, models: list[Source], passthrough: bool) -> None:
    """Same architecture (the block count may differ for passthrough), same tensor shapes, same tokenizer."""
    def arch(s: Source) -> dict:
        model = dict(s.config["model"])
        model.pop("dropout", None)
        if passthrough:
            model.pop("n_layer", None)
        return model

    for s in models:
        a, b = arch(ref), arch(s)
        if a != b:
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise ConfigError(f"{s.path} is another architecture than {ref.path}: {key} {b.get(key)!r} against "
                              f"{a.get(key)!r}; merge models of one architecture")
        ta, tb = tokenizer_hash(ref), tokenizer_hash(s)
        if ta != tb:
            raise ConfigError(f"{s.path} has another tokenizer than {ref.path} (sha256 {str(tb)[:12]} against "
                              f"{str(ta)[:12]}); merged weights would mean different tokens")
        if passthrough:
            continue
        for name, (_, shape) in ref.reader.entries.items():
            other = s.reader.entries.get(name)
            if other is None:
                raise CheckpointError(f"{s.path} has no tensor {name} (which {ref.path} has)")
            if other[1] != shape and name not in quantized_types(s.config) | quantized_types(ref.config):
                raise CheckpointError(f"tensor {name}: {s.path} has shape {list(other[1])}, {ref.path} has "
                                      f"{list(shape)}; merge models of one shape")


def tokenizer_hash(s: Source) -> str | None:
    recorded = (s.config.get("tokenizer") or {}).get("sha256")
    if recorded:
        return recorded
    path = Path(s.path) / TOKENIZER_FILE
    if path.is_file():
        from ..lora import file_sha256

        return file_sha256(path)
    return None


# --- the plan: which output tensor comes from what -------------------------------------------------------------


def output_plan(cfg: MergeConfig, sources: dict[str, Source], ref: Source) -> tuple[dict, int]:
    """({output name: (dtype, shape, [(source, input name), ...])}, output block count)."""
    n_layer = ref.config["model"]["n_layer"]
    entries = {name: (dtype, real_shape(ref, name, shape)) for name, (dtype, shape) in ref.reader.entries.items()}
    if cfg.method != "passthrough":
        models = [sources[m.model] for m in cfg.models]
        return {n: (d, s, [(m, n) for m in models]) for n, (d, s) in entries.items()}, n_layer
    plan, k = {}, 0
    outside = {n: v for n, v in entries.items() if not n.startswith("blocks.")}
    for s in cfg.slices:
        src = sources[s.model]
        have = src.config["model"]["n_layer"]
        if s.layers[1] > have:
            raise ConfigError(f"slice of {s.model}: layers {list(s.layers)} but it has {have} blocks")
        for i in range(*s.layers):
            prefix = f"blocks.{i}."
            for name, (dtype, shape) in src.reader.entries.items():
                if name.startswith(prefix):
                    out = f"blocks.{k}.{name[len(prefix):]}"
                    plan[out] = (dtype, real_shape(src, name, shape), [(src, name)])
            k += 1
    # outside the blocks, as mergekit: the embeddings from the first slice's model, the final norm and an untied
    # head from the last slice's (they were trained on what its blocks output)
    first, last = sources[cfg.slices[0].model], sources[cfg.slices[-1].model]
    below = {n: (d, s, [(first, n)]) for n, (d, s) in outside.items() if n.startswith(("tok_emb", "pos_emb"))}
    above = {n: (d, s, [(last, n)]) for n, (d, s) in outside.items() if n not in below}
    return {**below, **plan, **above}, k


def real_shape(s: Source, name: str, shape: tuple) -> tuple:
    """A quantized tensor's float shape (rows x weights per row), else the stored one."""
    qtype = quantized_types(s.config).get(name)
    if qtype is None:
        return shape
    from quant.formats import get_format

    return (*shape[:-1], get_format(qtype).k_from_row_bytes(shape[-1]))


def method_parameters(cfg: MergeConfig, name: str, n_layer: int) -> dict:
    """The method's parameters for tensor `name`: the config's, and the models' weights and densities where the
    method takes them."""
    params = tensor_parameters(cfg, name, n_layer)
    taken = {p.name for p in METHODS[cfg.method].params}
    weights, densities = model_values(cfg, name, n_layer)
    if "weight" in taken:
        params["weight"] = weights
    if "density" in taken and any(d is not None for d in densities):
        params["density"] = [params.get("density", 1.0) if d is None else d for d in densities]
    return params


# --- the merge ---------------------------------------------------------------------------------------------------


def merge(cfg: MergeConfig, out: str | os.PathLike, force: bool = False, progress: Progress | None = None) -> dict:
    """Merge `cfg`'s inputs into the model directory `out` (atomically), one tensor at a time; the resolved config
    goes into out/merge.json. Returns {out, method, tensors, n_layer, inputs}."""
    method = METHODS[cfg.method]
    if method.needs_base and not cfg.base:
        raise ConfigError(f"{cfg.method} needs the base the models were fine-tuned from: give --base")
    if cfg.method == "slerp" and len(cfg.models) != 2:
        raise ConfigError(f"slerp interpolates two models; {len(cfg.models)} were given")
    check_out(out, force, inputs=cfg.inputs)
    sources, ref = open_sources(cfg)
    plan, n_layer = output_plan(cfg, sources, ref)
    base = sources[cfg.base] if cfg.base else None
    base_used = base is not None and method.needs_base  # else the base only carries adapters
    depth_of = ref.config["model"]["n_layer"]
    with atomic_dir(out, force=force, inputs=cfg.inputs) as tmp:
        with SafetensorsWriter(tmp / WEIGHTS_FILE, {n: (d if d.is_floating_point else torch.float32, s)
                                                    for n, (d, s, _) in plan.items()}) as writer:
            for i, (name, (dtype, _, reads)) in enumerate(plan.items()):
                tensors = [src.get(src_name, cfg.dequantize) for src, src_name in reads]
                if cfg.method == "passthrough":
                    merged = tensors[0]
                else:
                    merged = merge_tensors(cfg.method, base.get(name, cfg.dequantize) if base_used else None,
                                           tensors, method_parameters(cfg, name, depth_of), name=name, seed=cfg.seed)
                writer.write(name, merged.to(dtype if dtype.is_floating_point else torch.float32))
                report(progress, "merging", i + 1, len(plan), unit="tensors", status=name)
        model = {**ref.config["model"], "n_layer": n_layer}
        sections = {"merge": {"method": cfg.method, "config": MERGE_CONFIG,
                              "inputs": [str(Path(p).resolve()) for p in cfg.inputs]}}
        if ref.config.get("tokenizer"):
            sections["tokenizer"] = ref.config["tokenizer"]
        tokenizer = Path(ref.path) / TOKENIZER_FILE
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        write_json(tmp / CONFIG_FILE, {"format_version": ref.config.get("format_version", 1), "model": model,
                                       **sections})
        write_json(tmp / MERGE_CONFIG, cfg.to_dict())
    return {"out": str(out), "method": cfg.method, "tensors": len(plan), "n_layer": n_layer,
            "inputs": cfg.inputs}
