"""The model directory: presets, atomic save, safe load, metadata (the heavy half of lbdl_cli.checkpoint).

A model is a directory holding `config.json` (format_version, the model
config, and the tokenizer / quantization sections where relevant),
`model.safetensors` and `tokenizer.model`. Weights are read with safetensors
only: nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenizer.config import TOKENIZER_FILE

from ..atomic import atomic_dir, check_out  # noqa: F401  (atomic_dir re-exported: the model directory's writer)
from ..errors import CheckpointError, ConfigError
from ..files import tensor_entries
from ..model import GPT, ModelConfig
from .configs import (  # noqa: F401  (default_model_dir, preset_names, read_config re-exported)
    CONFIG_FILE,
    FORMAT_VERSION,
    PICKLE_FILES,
    WEIGHTS_FILE,
    ConvertConfig,
    InitConfig,
    _presets_root,
    default_model_dir,
    preset_names,
    read_config,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32,
                      "I64": torch.int64, "I16": torch.int16}


# --- presets and the bundled default model -------------------------------------


def load_preset(name: str) -> tuple[ModelConfig, str]:
    """The config and description of a preset, by exact name."""
    path = _presets_root() / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    data = json.loads(path.read_text())
    return ModelConfig.from_dict(data["model"]), data.get("description", "")





def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --- save ---------------------------------------------------------------------------


def write_model(dir: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                tokenizer: str | os.PathLike | None = None, sections: dict | None = None) -> None:
    """Write config.json, model.safetensors (and tokenizer.model) into an existing directory. The tokenizer's
    sha256 and vocabulary size go into config.json's tokenizer section, so that a replaced tokenizer.model is
    caught when the model is loaded (model_tokenizer)."""
    save_tensors({k: v.detach().contiguous() for k, v in state.items()}, dir / WEIGHTS_FILE)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, dir / TOKENIZER_FILE)
        from tokenizer import Tokenizer

        tok = Tokenizer.load(dir / TOKENIZER_FILE)
        if tok.vocab_size != config.vocab_size:
            raise CheckpointError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens but the model's vocabulary has "
                                  f"{config.vocab_size}; give the tokenizer the model was trained with")
        sections = {**(sections or {}), "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256,
                                                      "vocab_size": tok.vocab_size}}
    write_json(dir / CONFIG_FILE, {"format_version": FORMAT_VERSION, "model": config.to_dict(), **(sections or {})})


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file with the permissions of any other file we write (safetensors itself makes it 0600)."""
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_model(model: GPT, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
               sections: dict | None = None, force: bool = False) -> Path:
    """Save a model directory atomically: a crash never leaves a half-written `out`."""
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, model.config, model.state_dict(), tokenizer, sections)
    return Path(out)


# --- load ---------------------------------------------------------------------------


def model_tokenizer(dir: str | os.PathLike, config: dict | None = None):
    """The tokenizer of a model directory, checked against the model: its vocabulary is the model's (a smaller
    one decodes garbage, a larger one indexes past the embeddings) and, where config.json records one, its
    sha256 is the one the model was saved with."""
    from tokenizer import Tokenizer

    dir = Path(dir)
    config = config if config is not None else read_config(dir)
    path = dir / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{dir} has no {TOKENIZER_FILE}, so its text cannot be encoded; copy in the "
                              f"tokenizer the model was trained with (cp TOKENIZER_DIR/{TOKENIZER_FILE} {dir}/)")
    tok = Tokenizer.load(path)
    vocab = config["model"].get("vocab_size")
    recorded = (config.get("tokenizer") or {}).get("sha256")
    if recorded is not None and recorded != tok.sha256:
        raise CheckpointError(f"{path} is not the tokenizer {dir} was saved with (sha256 {tok.sha256[:12]}, "
                              f"recorded {recorded[:12]}); put the model's own tokenizer.model back")
    if tok.vocab_size != vocab:
        raise CheckpointError(f"{path} has {tok.vocab_size} tokens but the model's vocabulary has {vocab}; the "
                              f"tokenizer does not belong to this model: put the one it was trained with beside it")
    return tok


def model_config(config: dict, where) -> ModelConfig:
    try:
        return ModelConfig.from_dict(config["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def weights_path(dir: Path) -> Path:
    path = dir / WEIGHTS_FILE
    if not path.is_file():
        pickled = [name for name in PICKLE_FILES if (dir / name).exists()]
        if pickled:
            raise CheckpointError(
                f"{dir} holds {pickled[0]} but no {WEIGHTS_FILE}; lbdl never loads pickle files: convert it to "
                f"safetensors first"
            )
        raise CheckpointError(f"{dir} has no {WEIGHTS_FILE}; the model directory is incomplete")
    return path


@contextlib.contextmanager
def open_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        if type(e).__name__ != "SafetensorError" and not isinstance(e, (OSError, ValueError)):
            raise
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); re-save or re-download "
                              f"it") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def tensor_dtypes(path: Path) -> dict[str, str]:
    """Stored dtype names (safetensors' F32, BF16, ...) read from the header alone."""
    return {k: v["dtype"] for k, v in tensor_entries(path).items()}


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where) -> None:
    """Raise a one-line error for missing, unexpected or mis-shaped tensors."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where} is missing tensor(s) {', '.join(missing[:3])}{more}; the file does not "
                              f"match its config")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{where} has unexpected tensor(s) {', '.join(unexpected[:3])}{more}; the file does "
                              f"not match its config")
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {k} has shape {list(found[k])} but the config expects {list(shape)}"
            )


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, float32 or bfloat16")
    return DTYPES[name]


def load_model(dir: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", quant_backend: str | None = None) -> tuple[GPT, dict]:
    """Load a model directory: build on the meta device, then assign the stored tensors.

    Tensors keep their stored dtype unless `dtype` is given. Quantized weights take
    the runtime form `quant_backend` names (quant.linear's backends; None: the one
    this machine runs fastest, kernels.quant_backend). Returns the model (in eval
    mode) and the parsed config.json.
    """
    dir = Path(dir)
    config = read_config(dir)
    cfg = model_config(config, dir / CONFIG_FILE)
    path = weights_path(dir)
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = GPT(cfg)
    quantized = _quantized_types(config, dir / CONFIG_FILE)
    if quantized:  # swap in empty quantized modules: their packed bytes are loaded as they are
        from quant.linear import prepare_quantized

        from ..kernels import quant_backend as fastest

        try:
            prepare_quantized(model, quantized, backend=quant_backend or fastest(device))
        except (AttributeError, ValueError) as e:
            raise CheckpointError(f"{dir / CONFIG_FILE}: quantization section does not fit the model ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    with open_safetensors(path) as f:
        check_tensors(expected, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, path)
        try:
            for k in expected:
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                t = t.to(device)
                if quantized and k not in quantized:
                    t = t.clone()  # own copy: nothing holds the file's mapping once the packed bytes are converted
                state[k] = t
        except Exception as e:
            raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); re-save or "
                                  f"re-download it") from None
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_rope(device=device)
    if quantized:  # the float dtype quantized modules take and report
        from quant.linear import finish_loading

        finish_loading(model, dtype or next(p.dtype for p in model.parameters() if p.is_floating_point()))
    return model.eval(), config


def _quantized_types(config: dict, where) -> dict[str, str]:
    """{tensor name: quantization type} of a quantized model directory ({} for a float one)."""
    section = config.get("quantization")
    if not section:
        return {}
    from quant.formats import FORMATS

    types = section.get("tensors") if isinstance(section, dict) else None
    if not isinstance(types, dict):
        raise CheckpointError(f"{where}: the quantization section has no 'tensors' map; re-quantize the model")
    unknown = sorted({str(t) for t in types.values() if t not in FORMATS})
    if unknown:
        raise CheckpointError(f"{where}: unknown quantization type(s) {', '.join(unknown)}; this lbdl knows "
                              f"{', '.join(FORMATS)} (upgrade lbdl)")
    return types


def convert_dtype(model_dir: str | os.PathLike, dtype: str, out: str | os.PathLike, force: bool = False) -> dict:
    """Re-save a model directory (tokenizer and sections kept) with its floating-point weights in `dtype`."""
    dtype = ConvertConfig(weights_dtype=dtype).weights_dtype  # checked
    check_out(out, force, inputs=(model_dir,))
    model, config = load_model(model_dir, dtype=dtype)
    if "quantization" in config:
        raise CheckpointError(f"{model_dir} is quantized; convert the unquantized model")
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    sections = {k: v for k, v in config.items() if k not in ("format_version", "model")}
    with atomic_dir(out, force=force, inputs=(model_dir,)) as tmp:
        write_model(tmp, model.config, model.state_dict(), tokenizer if tokenizer.is_file() else None, sections)
    return {"out": str(out), "dtype": dtype, "params": model.num_params()}


# --- metadata ------------------------------------------------------------------------


def dir_size(dir: Path) -> int:
    return sum(p.stat().st_size for p in dir.rglob("*") if p.is_file())


def model_info(dir: str | os.PathLike) -> dict:
    """What `lbdl info` shows, read from config.json and the safetensors header only."""
    from ..model import flops_per_token

    dir = Path(dir)
    config = read_config(dir)
    cfg = model_config(config, dir / CONFIG_FILE)
    path = weights_path(dir)
    shapes = tensor_shapes(path)
    dtypes = tensor_dtypes(path)
    qtypes = _quantized_types(config, dir / CONFIG_FILE)
    tensors = _tensor_table(path, shapes, dtypes, qtypes)
    n_params = sum(math.prod(t["shape"]) for t in tensors)
    weight_bytes = sum(t["bytes"] for t in tensors)
    info = {
        "path": str(dir),
        "format_version": config["format_version"],
        "model": cfg.to_dict(),
        "params": n_params,
        "flops_per_token": flops_per_token(cfg, training=False),
        "size_bytes": dir_size(dir),
        "dtypes": sorted(set(dtypes.values())),
        "bits_per_weight": 8 * weight_bytes / n_params if n_params else 0.0,
        "tensors": tensors,
        "tokenizer": config.get("tokenizer") or ({"file": TOKENIZER_FILE} if (dir / TOKENIZER_FILE).exists() else None),
    }
    for section in ("quantization", "training", "source"):
        if section in config:
            info[section] = config[section]
    if qtypes:  # each tensor's type is in `tensors`; the section keeps the summary
        info["quantization"] = {k: v for k, v in config["quantization"].items() if k != "tensors"}
    return info


def _tensor_table(path: Path, shapes: dict, dtypes: dict, qtypes: dict) -> list[dict]:
    """Name, logical shape, type (a quantization type or the stored dtype) and bytes of every tensor."""
    from quant.formats import FORMATS

    header = tensor_entries(path)
    table = []
    for name, shape in shapes.items():
        begin, end = header[name]["data_offsets"]
        shape = list(shape)
        if name in qtypes:
            fmt = FORMATS[qtypes[name]]
            try:
                shape[-1] = fmt.k_from_row_bytes(shape[-1])
            except ConfigError:
                raise CheckpointError(f"{path}: tensor {name} is not whole {fmt.name} rows") from None
        table.append({"name": name, "shape": shape, "type": qtypes.get(name, dtypes[name]), "bytes": end - begin})
    return table



def create_model(out: str | os.PathLike, init: InitConfig, force: bool = False) -> dict:
    """A freshly initialised model directory from a preset, checked with one forward pass."""
    import math

    from ..model import flops_per_token, random_token_loss

    preset, vocab_size, block_size, seed = init.preset, init.vocab_size, init.context, init.seed
    dtype = init.weights_dtype
    if preset is None:
        raise ConfigError(f"give --preset NAME; valid presets: {', '.join(preset_names())}")
    check_out(out, force)
    cfg, _ = load_preset(preset)
    changes = {k: v for k, v in (("vocab_size", vocab_size), ("block_size", block_size)) if v is not None}
    cfg = cfg.replace(**changes)
    torch.manual_seed(seed)
    model = GPT(cfg)
    loss = random_token_loss(model, seed=seed)
    target = parse_dtype(dtype)
    if target is not None:
        model = model.to(target)
    save_model(model, out, force=force, sections={"source": {"preset": preset, "seed": seed}})
    return {"out": str(out), "preset": preset, "params": model.num_params(),
            "flops_per_token": flops_per_token(cfg, training=False), "initial_loss": loss,
            "ln_vocab": math.log(cfg.vocab_size), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "model": cfg.to_dict()}
