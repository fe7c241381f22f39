"""MergeConfig: what `lbdl merge` merges, how, and with which parameters, per tensor. Torch-free.

A TOML or JSON file (`--config`), or the same through flags; the output directory keeps the resolved config
as merge.json, which `--config` takes back to rerun the merge:

    method = "ties"
    base = "models/default"
    seed = 0
    [parameters]            # the method's, for every tensor
    density = 0.5
    [[models]]
    model = "runs/a/best"   # a model directory, or a LoRA adapter directory over the base
    weight = 1.0
    [[models]]
    model = "runs/b/best"
    weight = [0.2, 1.0]     # a gradient over depth: interpolated over the blocks
    [[tensors]]             # parameters for the tensors whose name matches (later tables win)
    match = "blocks.*.mlp.*"
    density = 0.3
    [[slices]]              # passthrough: the output's blocks, in order
    model = "runs/a/best"
    layers = [0, 4]         # blocks 0..3

A value given as a list is a gradient over depth (mergekit's convention): block i of L takes the list
interpolated linearly at i / (L - 1); tensors below the blocks (embeddings) take its first value, those above
(final norm, head) its last.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import MAX_SEED, Config, setting
from ..errors import ConfigError

METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "passthrough")
MERGE_CONFIG = "merge.json"  # what the output directory keeps of the merge
Value = float | bool | list


@dataclass(frozen=True)
class MergeModel:
    model: str
    weight: Value = 1.0
    density: Value | None = None  # this model's TIES/DARE density (none: the method's)


@dataclass(frozen=True)
class Slice:
    model: str
    layers: tuple[int, int]  # [first, end): blocks first..end-1 of `model`


@dataclass(frozen=True)
class MergeConfig:
    method: str
    models: tuple[MergeModel, ...] = ()
    base: str | None = None
    parameters: dict = field(default_factory=dict)
    tensors: tuple[dict, ...] = ()  # [{"match": glob, parameter: value, ...}]
    slices: tuple[Slice, ...] = ()
    seed: int = 0
    dequantize: bool = False

    def __post_init__(self):
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"merge method {self.method!r} is not one of {', '.join(METHOD_NAMES)} "
                              f"(see `lbdl merge --list`)")
        if self.method == "passthrough":
            if not self.slices:
                raise ConfigError("passthrough needs slices: [[slices]] tables of model and layers = [first, end]")
            for s in self.slices:
                if len(s.layers) != 2 or not 0 <= s.layers[0] < s.layers[1]:
                    raise ConfigError(f"slice of {s.model}: layers must be [first, end] with 0 <= first < end, "
                                      f"got {list(s.layers)}")
        elif not self.models:
            raise ConfigError(f"{self.method} merges models: give them (--model DIR, or [[models]] tables)")
        elif self.slices:
            raise ConfigError(f"slices are passthrough's; {self.method} merges whole models")
        for table in self.tensors:
            if not isinstance(table.get("match"), str):
                raise ConfigError(f"a [[tensors]] table needs match = \"<glob over tensor names>\", got {table!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"merge seed must be a non-negative integer, got {self.seed!r}")

    @property
    def inputs(self) -> list[str]:
        """Every directory the merge reads, the base first."""
        names = ([self.base] if self.base else []) + [m.model for m in self.models] + [s.model for s in self.slices]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["slices"] = [{"model": s["model"], "layers": list(s["layers"])} for s in out["slices"]]
        return {k: v for k, v in out.items() if v not in (None, (), [], {})}

    @classmethod
    def from_dict(cls, d: dict, where: str = "merge config") -> "MergeConfig":
        known = {"method", "models", "base", "parameters", "tensors", "slices", "seed", "dequantize"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(known))}")
        try:
            models = tuple(MergeModel(**m) for m in d.get("models", ()))
            slices = tuple(Slice(s["model"], tuple(s["layers"])) for s in d.get("slices", ()))
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{where}: a [[models]] or [[slices]] table is malformed ({e})") from None
        return cls(method=d.get("method", ""), models=models, base=d.get("base"),
                   parameters=dict(d.get("parameters", {})), tensors=tuple(d.get("tensors", ())), slices=slices,
                   seed=d.get("seed", 0), dequantize=bool(d.get("dequantize", False)))


@dataclass(frozen=True)
class MergeFlags(Config):
    """The numbers `lbdl merge` takes as flags, range-checked before they join a MergeConfig."""

    weights: tuple[float, ...] = setting((), "The weight of each --model.", low=-1e6, high=1e6)
    density: float | None = setting(None, "TIES/DARE: the fraction of each task vector kept.", low=0, low_open=True,
                                    high=1)
    lambda_: float | None = setting(None, "Scale of the merged task vector.", low=-1e6, high=1e6)
    t: float | None = setting(None, "SLERP's interpolation point.", low=0, high=1)
    seed: int | None = setting(None, "DARE's seed.", low=0, high=MAX_SEED)

    def __post_init__(self):
        self.check_ranges()


def read_merge_config(path: str | Path) -> MergeConfig:
    """A merge config file: TOML, or JSON (an output directory's merge.json)."""
    from ..config import read_toml
    from ..files import read_json

    path = Path(path)
    if path.suffix == ".json":
        return MergeConfig.from_dict(read_json(path, "merge config", error=ConfigError), str(path))
    data, where = read_toml(str(path))
    return MergeConfig.from_dict(data, where)


# --- per-tensor values ------------------------------------------------------------------------------------------


def layer_of(name: str, n_layer: int) -> float:
    """Where a tensor sits in depth, in [0, 1]: block i of n at i / (n - 1); below the blocks 0, above 1."""
    m = re.match(r"blocks\.(\d+)\.", name)
    if m is None:
        return 0.0 if name.startswith(("tok_emb", "pos_emb")) else 1.0
    return int(m.group(1)) / max(1, n_layer - 1)


def at_depth(value: Value, depth: float, what: str):
    """A scalar as it is; a list (a gradient over depth) interpolated linearly at `depth` in [0, 1]."""
    if not isinstance(value, list):
        return value
    if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{what}: a gradient must be a non-empty list of numbers, got {value!r}")
    if len(value) == 1:
        return float(value[0])
    x = depth * (len(value) - 1)
    x = round(x) if abs(x - round(x)) < 1e-9 else x  # a list of one value per block gives exactly that value
    i = min(int(x), len(value) - 2)
    return float(value[i] + (x - i) * (value[i + 1] - value[i]))


def tensor_parameters(cfg: MergeConfig, name: str, n_layer: int) -> dict:
    """The method's parameters for tensor `name`: [parameters] <- each matching [[tensors]] table, gradients
    resolved at its depth."""
    values = dict(cfg.parameters)
    for table in cfg.tensors:
        if fnmatch.fnmatchcase(name, table["match"]):
            values.update({k: v for k, v in table.items() if k != "match"})
    depth = layer_of(name, n_layer)
    return {k: at_depth(v, depth, f"merge parameter {k}") for k, v in values.items()}


def model_values(cfg: MergeConfig, name: str, n_layer: int) -> tuple[list[float], list[float | None]]:
    """(weights, densities) of the models for tensor `name`."""
    depth = layer_of(name, n_layer)
    weights = [float(at_depth(m.weight, depth, f"weight of {m.model}")) for m in cfg.models]
    densities = [None if m.density is None else float(at_depth(m.density, depth, f"density of {m.model}"))
                 for m in cfg.models]
    return weights, densities
