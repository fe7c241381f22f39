"""The merge methods of `lbdl merge` (LBDL 8.4, issue #14) as functions from one tensor per model to the merged
tensor, in float32 (inputs cast; the driver casts the result), and METHODS, the registry for the driver and --list.

They follow mergekit 0.1.5 (merge_methods/{linear,slerp,generalized_task_arithmetic,registry}.py, sparsify.py): one
function, `task_merge`, is task_arithmetic, ties and dare_* (sparsify each task vector by magnitude or at random,
elect a sign per entry from the weighted sum, 0 counting as +, normalize, scale by lambda); the defaults are
mergekit's (normalize on for linear and ties, rescale on for dare_*, density and lambda 1); slerp takes the angle of
the normalised tensors and lerps above |cos| 0.9995. Differences: rescale divides the kept entries by density
(DARE's 1/(1-p), which keeps the expectation) where mergekit matches the L1 norm of the undropped tensor; a weight
left out is 1; mergekit's int8_mask, count election, other sparsifiers and passthrough's scale are left out.

DARE's drop is reproducible and independent of the order of the tensors: `drop_generator(seed, name)` seeds a CPU
generator with the first 8 bytes (little-endian) of sha256(f"{seed}:{name}"), `name` the tensor's; the models'
masks are drawn from it in the models' order, on the CPU (the same masks on any device).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError

Tensor = torch.Tensor
Values = float | Sequence[float]  # one per model, or one number for all
DOT_THRESHOLD = 0.9995  # slerp: |cos| above this is parallel enough for linear interpolation (mergekit's)
NORM_EPS = 1e-8  # slerp: a tensor of smaller norm is left unnormalised when measuring the angle (mergekit's)
MODEL_COUNTS = {"any": None, "one": 1, "two": 2}  # Method.models -> how many tensors it takes (None: one or more)


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([x.float() for x in tensors])  # [n, *shape]


def _each(values: Values, n: int) -> list[float]:
    """One value per model; a single number is every model's."""
    out = [float(values)] * n if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(out) != n:
        raise ConfigError(f"{len(out)} per-model values for {n} models; give one per model or a single number")
    return out


def _column(values: Values, like: Tensor) -> Tensor:
    """One value per model as [n, 1, ..., 1], to broadcast over `like`'s [n, *shape]."""
    n = len(like)
    return torch.tensor(_each(values, n), dtype=torch.float32, device=like.device).view(n, *[1] * (like.dim() - 1))


def linear(tensors: Sequence[Tensor], weights: Values, normalize: bool = True) -> Tensor:
    """sum_i w_i theta_i, divided by sum_i w_i when normalize (a weighted mean: a model soup)."""
    x = _stack(tensors)  # [n, *shape]
    w = _column(weights, x)  # [n, 1...]
    out = (w * x).sum(0)  # [*shape]
    if not normalize:
        return out
    if float(w.sum()) == 0:
        raise ConfigError("linear: the weights sum to 0, so normalize cannot divide by them; change a weight or "
                          "set normalize = false")
    return out / w.sum()


def drop_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of DARE's drop for tensor `name`: the same for the same (seed, name), in any order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sparsify(delta: Tensor, density: float, method: str, rescale: bool = False,
             generator: torch.Generator | None = None) -> Tensor:
    """`delta` [*shape] with all but a `density` fraction of its entries zeroed: "magnitude" keeps the
    max(1, int(density * numel)) largest |delta| (mergekit's count), "random" keeps each entry with probability
    `density` (drawn from `generator`, on the CPU). `rescale` divides the kept entries by density. 1 keeps all."""
    if density >= 1:
        return delta
    if method == "magnitude":
        k = max(1, int(density * delta.numel()))
        top = delta.abs().flatten().argsort(descending=True, stable=True)[:k]  # [k] flat indices
        keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device).index_fill_(0, top, True)
        keep = keep.view(delta.shape)  # [*shape]
    elif method == "random":
        keep = (torch.rand(delta.shape, generator=generator) < density).to(delta.device)  # [*shape]
    else:
        raise ConfigError(f"unknown sparsification {method!r}; use magnitude or random")
    out = delta * keep
    return out / density if rescale else out


def task_merge(base: Tensor, tensors: Sequence[Tensor], weights: Values, densities: Values = 1.0, *,
               lambda_: float = 1.0, normalize: bool = False, rescale: bool = False, sparsification: str | None = None,
               sign_consensus: bool = False, name: str = "", seed: int = 0) -> Tensor:
    """base + lambda * sum_i w_i sparsify(tau_i), divided by the sum of the weights when normalize; with
    sign_consensus only the entries of the elected sign count, in the sum and in the divisor."""
    base = base.float()  # [*shape]
    deltas = _stack(tensors) - base  # [n, *shape]: the task vectors
    if sparsification:
        gen = drop_generator(seed, name) if sparsification == "random" else None
        densities = _each(densities, len(deltas))
        deltas = torch.stack([sparsify(d, p, sparsification, rescale, gen) for d, p in zip(deltas, densities)])
    w = _column(weights, deltas)  # [n, 1...]
    weighted = deltas * w  # [n, *shape]
    if sign_consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # [*shape]: mergekit's "sum" election
        agree = weighted.sign() == elected  # [n, *shape]; a zero entry agrees with neither sign
        mixed = (weighted * agree).sum(0)  # [*shape]
        divisor = (w * agree).sum(0)  # [*shape]
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(0)  # [*shape]
        divisor = w.sum(0)  # [1...]
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Values, lambda_: float = 1.0,
                    normalize: bool = False) -> Tensor:
    """base + lambda * sum_i w_i (theta_i - base) (/ sum_i w_i when normalize); a negative weight subtracts a task."""
    return task_merge(base, tensors, weights, lambda_=lambda_, normalize=normalize)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Values, densities: Values = 1.0, lambda_: float = 1.0,
         normalize: bool = True, rescale: bool = False) -> Tensor:
    """TIES: trim each task vector to its largest entries, elect a sign per entry, mean of the agreeing ones."""
    return task_merge(base, tensors, weights, densities, lambda_=lambda_, normalize=normalize, rescale=rescale,
                      sparsification="magnitude", sign_consensus=True)


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Values, densities: Values = 1.0,
                lambda_: float = 1.0, normalize: bool = False, rescale: bool = True, name: str = "",
                seed: int = 0) -> Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale the rest, add up."""
    return task_merge(base, tensors, weights, densities, lambda_=lambda_, normalize=normalize, rescale=rescale,
                      sparsification="random", name=name, seed=seed)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Values, densities: Values = 1.0,
              lambda_: float = 1.0, normalize: bool = False, rescale: bool = True, name: str = "",
              seed: int = 0) -> Tensor:
    """DARE's random drop, then TIES's sign election."""
    return task_merge(base, tensors, weights, densities, lambda_=lambda_, normalize=normalize, rescale=rescale,
                      sparsification="random", sign_consensus=True, name=name, seed=seed)


def slerp(tensors: Sequence[Tensor], t: float = 0.5) -> Tensor:
    """Spherical interpolation from tensors[0] (t = 0) to tensors[1] (t = 1), on the angle between them as
    flattened vectors; linear interpolation when they are nearly parallel or antiparallel."""
    if len(tensors) != 2:
        raise ConfigError(f"slerp interpolates between exactly two models, got {len(tensors)}")
    v0, v1 = (x.float() for x in tensors)  # [*shape] each
    n0, n1 = (float(torch.linalg.vector_norm(v)) for v in (v0, v1))
    dot = float(torch.dot(v0.flatten(), v1.flatten())) / ((n0 if n0 > NORM_EPS else 1) * (n1 if n1 > NORM_EPS else 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)  # the angle between them
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def passthrough(tensors: Sequence[Tensor]) -> Tensor:
    """The one input as it is (in float32): the driver chooses which model's tensor each output tensor is."""
    if len(tensors) != 1:
        raise ConfigError(f"passthrough copies one model's tensor, got {len(tensors)}")
    return tensors[0].float()


@dataclass(frozen=True)
class Param:
    """A method's parameter; per_model: one value per model (or one for all); arg: the function's keyword."""

    name: str
    default: float | bool
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    per_model: bool = False
    arg: str = ""


@dataclass(frozen=True)
class Method:
    """A merge method: `function(base, tensors, **params)` when needs_base, else `function(tensors, **params)`."""

    name: str
    function: Callable[..., Tensor]
    needs_base: bool
    models: str  # a key of MODEL_COUNTS
    params: tuple[Param, ...]
    paper: str

    def __post_init__(self):
        if self.models not in MODEL_COUNTS:
            raise ConfigError(f"method {self.name}: models {self.models!r}; use one of {', '.join(MODEL_COUNTS)}")


WEIGHT = Param("weight", 1.0, "This model's weight (negative subtracts its task vector).", per_model=True,
               arg="weights")
DENSITY = Param("density", 1.0, "Fraction of this model's task vector kept (1 keeps all).", low=0.0, low_open=True,
                high=1.0, per_model=True, arg="densities")
LAMBDA = Param("lambda", 1.0, "Scale of the merged task vector.", arg="lambda_")
NORMALIZE = "Divide by the sum of the weights (under sign consensus: of the weights that agree, per entry)."
RESCALE = "Divide the kept entries of a task vector by its density."
DARE = "Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free " \
       "Lunch, arXiv:2311.03099"
SPARSE = (WEIGHT, DENSITY, LAMBDA)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", linear, False, "any", (WEIGHT, Param("normalize", True, NORMALIZE)),
           "Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models improves accuracy "
           "without increasing inference time, arXiv:2203.05482"),
    Method("task_arithmetic", task_arithmetic, True, "any", (WEIGHT, LAMBDA, Param("normalize", False, NORMALIZE)),
           "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"),
    Method("ties", ties, True, "any", (*SPARSE, Param("normalize", True, NORMALIZE), Param("rescale", False, RESCALE)),
           "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708"),
    Method("dare_linear", dare_linear, True, "any",
           (*SPARSE, Param("normalize", False, NORMALIZE), Param("rescale", True, RESCALE)), DARE),
    Method("dare_ties", dare_ties, True, "any",
           (*SPARSE, Param("normalize", False, NORMALIZE), Param("rescale", True, RESCALE)), DARE),
    Method("slerp", slerp, False, "two",
           (Param("t", 0.5, "Interpolation point: 0 is the first model, 1 the second.", low=0.0, high=1.0),),
           "Shoemake 1985, Animating Rotation with Quaternion Curves, SIGGRAPH '85"),
    Method("passthrough", passthrough, False, "one", (),
           "layer stacking as in Kim et al. 2023, SOLAR 10.7B: Scaling Large Language Models with Simple yet "
           "Effective Depth Up-Scaling, arXiv:2312.15166"),
)}


def _range(p: Param) -> str | None:
    """The allowed values as an interval, "(0, 1]"; None when any number goes."""
    if p.low is None and p.high is None:
        return None
    return (f"{'(' if p.low_open or p.low is None else '['}{-math.inf if p.low is None else p.low:g}, "
            f"{math.inf if p.high is None else p.high:g}{')' if p.high is None else ']'}")


def _checked(p: Param, value, where: str):
    """`value` as the parameter's type, or a ConfigError naming it and its range."""
    if isinstance(p.default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {p.name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {p.name} must be a finite number, got {value!r}")
    if (p.low is not None and (value <= p.low if p.low_open else value < p.low)) or \
            (p.high is not None and value > p.high):
        raise ConfigError(f"{where}: {p.name} must be in {_range(p)}, got {value!r}")
    return float(value)


def _arguments(m: Method, params: dict, n: int) -> dict:
    """The function's keyword arguments: defaults filled in, unknown names, ranges and counts refused."""
    unknown = sorted(set(params) - {p.name for p in m.params})
    if unknown:
        valid = ", ".join(p.name for p in m.params) or "none"
        raise ConfigError(f"{m.name}: unknown parameter {unknown[0]!r}; its parameters: {valid}")
    out = {}
    for p in m.params:
        value = params.get(p.name, p.default)
        if p.per_model:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ConfigError(f"{m.name}: {p.name} has {len(values)} values for {n} models; give one per model")
            value = tuple(_checked(p, v, m.name) for v in values)
        else:
            value = _checked(p, value, m.name)
        out[p.arg or p.name] = value
    return out


def merge_tensors(method: str, base: Tensor | None, tensors: Sequence[Tensor], params: dict, name: str,
                  seed: int = 0) -> Tensor:
    """The merged tensor `name` (float32) of `tensors` (one per model, in the models' order) by `method`, after
    checking the method, the base, the count and shapes of the tensors and `params` (per-model ones as one value
    or a list); `seed` and `name` seed DARE's drop."""
    m = METHODS.get(method)
    if m is None:
        raise ConfigError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if m.needs_base and base is None:
        raise ConfigError(f"{method} needs a base model (the task vectors are differences from it); give one")
    if not m.needs_base and base is not None:
        raise ConfigError(f"{method} takes no base model; list it among the models to merge instead")
    count = MODEL_COUNTS[m.models]
    if not tensors or (count is not None and len(tensors) != count):
        raise ConfigError(f"{method} merges {m.models if count else 'one or more'} model(s), got {len(tensors)} for "
                          f"tensor {name!r}")
    ref, ref_name = (base, "the base") if base is not None else (tensors[0], "model 0")
    for i, x in enumerate(tensors):
        if x.shape != ref.shape:
            raise ConfigError(f"tensor {name!r}: model {i} has shape {tuple(x.shape)} but {ref_name} has "
                              f"{tuple(ref.shape)}; merge models of one architecture and size")
    kwargs = _arguments(m, params, len(tensors))
    accepted = inspect.signature(m.function).parameters
    kwargs.update({k: v for k, v in (("name", name), ("seed", seed)) if k in accepted})
    return m.function(*((base, tensors) if m.needs_base else (tensors,)), **kwargs)


def describe() -> list[dict]:
    """Every method for `lbdl merge --list`: name, paper, needs_base, models and its parameters with defaults."""
    return [{"name": m.name, "paper": m.paper, "needs_base": m.needs_base, "models": m.models,
             "params": [{"name": p.name, "default": p.default, "help": p.help, "per_model": p.per_model,
                         "range": _range(p)} for p in m.params]} for m in METHODS.values()]
