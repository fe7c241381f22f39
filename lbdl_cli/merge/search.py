"""Merge search (LBDL 8.4, issue #14): the merge recipe found by CMA-ES on task files, after Akiba et al. 2024,
Evolutionary Optimization of Model Merging Recipes (arXiv:2403.13187).

    result = search("models/base", ["runs/a/best", "runs/b/best"], ["a.jsonl", "b.jsonl"],
                    SearchConfig(space="params", trials=40), out="merged")

Every candidate is a MergeConfig (method task_arithmetic, ties or dare_ties over --base) whose per-model weights
are gradients of one value per block (a list of n_layer values: block i reads value i, config.at_depth), so the
best one is an ordinary merge: out/merge.json reruns it with `lbdl merge --config`. The search space maps a
vector x (what CMA-ES samples, within bounds) to that config:

- params: a weight per (model, block) in [0, 1.5] (Akiba et al.'s parameter-space merge); with ties or dare_ties
  also a density per model in [0.05, 1]. The mean is the plain task-arithmetic merge: every weight 1 (densities
  0.5).
- layers: layer recombination, per block a score in [0, 1] for each input, the base first then the models; the
  block comes whole from the input of the highest score (the first on a tie): weight 1 for that model and 0 for
  the others, all 0 for the base, density 1 (no trimming), so every method copies the block (base + (theta_k -
  base), equal to theta_k up to float rounding). The mean ties every score, so the first candidate is the base.
- both: per block a score for the parameter merge, the base and each model (in that order); the block is either
  the merge of the params space (the per-(model, block) weights and the models' densities) or one input whole.
  The mean ties every score, so the first candidate is the params space's first.

This is a simplification of Akiba et al.'s data-flow space: the blocks keep their order and count (no block is
repeated or skipped, and no scaling between blocks). The tensors outside the blocks follow the gradient's ends
(config.layer_of): the embeddings take block 0's values, the final norm and the head those of the last block, so
in the layers space they come from block 0's and the last block's input.

A candidate is merged in memory (the inputs' tensors are read once, through the driver's open_sources; each
tensor merged by merge_tensors with the driver's parameters, so the written merge is the scored one), loaded
into a GPT in float32 and scored on every --eval file:

- loss (lower is better): the mean negative log-likelihood in nats of the completion's tokens and the <eos>
  after it, given the prompt: records' "prompt" and "completion" (or "answer", as text), encoded as fine-tuning
  encodes completion records (records.encode_records), so it is the loss `lbdl finetune` minimises.
- accuracy (higher is better): exact match of greedy completions (evaluate.task_accuracy, its defaults).

The objective is the mean over the files. Trial 0 is the space's mean; then CMA-ES (cmaes.CMA, seeded by --seed,
the same trials for the same seed) asks a generation of candidates and is told their objectives. The output
directory holds the best candidate's merge (written by the driver), search.json (the settings, every trial: x,
the models' weights and densities, the blocks' inputs, the scores per file, the objective; the best trial) and
trials.md (a table), written atomically.

A search that is killed resumes: each scored trial is appended to OUT.trials.jsonl (after a line of the
settings); a rerun with the same settings replays it (the same seed asks the same candidates, which are told the
recorded objectives instead of being scored again) and goes on. The file is removed when the search is done.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir, check_out
from ..config import Config, device_setting, setting
from ..errors import ConfigError
from ..progress import Progress, report
from .config import MergeConfig, MergeModel
from .score import Scorer, read_eval

SPACES = ("params", "layers", "both")
SEARCH_METHODS = ("task_arithmetic", "ties", "dare_ties")
METRICS = ("loss", "accuracy")
WEIGHTS = (0.0, 1.5)  # a searched weight's bounds
DENSITIES = (0.05, 1.0)  # a searched density's bounds
INITIAL_WEIGHT, INITIAL_DENSITY, INITIAL_SCORE = 1.0, 0.5, 0.5  # the mean of the search (trial 0)
SEARCH_FILE, TRIALS_FILE, JOURNAL_SUFFIX = "search.json", "trials.md", ".trials.jsonl"
MAX_CMA_SEED = 2**32 - 1  # numpy's RandomState, which cmaes seeds
NEEDS_EXTRA = "lbdl merge search needs the search extra: pip install 'lbdl[search]'"


@dataclass(frozen=True)
class SearchConfig(Config):
    """`lbdl merge search`: the space, the optimiser's budget and how candidates are scored."""

    space: str = setting("params", "What is searched: params (a weight per model and block) | layers (per block, "
                                   "which input it comes from) | both (per block, an input or the merge).",
                         choices=SPACES)
    trials: int = setting(20, "Candidates to score, the first being the space's mean.", low=1, high=1 << 20)
    method: str = setting("task_arithmetic", "Merge method of the candidates.", choices=SEARCH_METHODS)
    metric: str = setting("loss", "Score: loss (mean NLL of the completions, lower is better) | accuracy (exact "
                                  "match of greedy completions, higher is better).", choices=METRICS)
    seed: int = setting(0, "Seed of CMA-ES (and of DARE's drop).", low=0, high=MAX_CMA_SEED)
    limit: int | None = setting(None, "Score only the first N records of each --eval file.", low=1, high=1 << 30)
    sigma: float = setting(0.3, "CMA-ES's initial step size (weights span 1.5, scores 1).", low=0.01, high=1.0)
    population: int | None = setting(None, "Candidates per CMA-ES generation (default: 4 + 3 ln of the "
                                           "dimension).", low=4, high=1 << 16)
    device: str = device_setting()


# --- the space: a vector x <-> a merge config ------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """x = [block scores (L x options, block-major), weights (models x L, model-major), densities (models)],
    each part present only where the space has it."""

    kind: str
    method: str
    models: tuple[str, ...]
    n_layer: int

    @property
    def options(self) -> tuple[str, ...]:
        """What a block can be: "merge", "base" or a model's path (layers and both)."""
        inputs = ("base", *self.models)
        return {"params": (), "layers": inputs, "both": ("merge", *inputs)}[self.kind]

    @property
    def sparse(self) -> bool:
        return self.kind != "layers" and self.method != "task_arithmetic"

    @property
    def parts(self) -> tuple[int, int, int]:
        """(scores, weights, densities): the length of each part of x."""
        m, n = len(self.models), self.n_layer
        return n * len(self.options), (0 if self.kind == "layers" else m * n), (m if self.sparse else 0)

    @property
    def dim(self) -> int:
        return sum(self.parts)

    def bounds(self) -> list[tuple[float, float]]:
        scores, weights, densities = self.parts
        return [(0.0, 1.0)] * scores + [WEIGHTS] * weights + [DENSITIES] * densities

    def mean(self) -> list[float]:
        scores, weights, densities = self.parts
        return [INITIAL_SCORE] * scores + [INITIAL_WEIGHT] * weights + [INITIAL_DENSITY] * densities

    def decode(self, x) -> tuple[list[list[float]], list[list[float]] | None, list[str] | None]:
        """(weights [model][block], densities [model][block] or None, each block's option or None) of x."""
        x = [float(v) for v in x]
        if len(x) != self.dim:
            raise ConfigError(f"a {self.kind} candidate has {self.dim} values, got {len(x)}")
        m, n = len(self.models), self.n_layer
        n_scores, n_weights, _ = self.parts
        searched = [x[n_scores + k * n:n_scores + (k + 1) * n] for k in range(m)] if n_weights else None
        dens = x[n_scores + n_weights:] if self.sparse else None
        if not self.options:
            return searched, ([[d] * n for d in dens] if dens else None), None
        width = len(self.options)
        blocks = []
        for i in range(n):
            row = x[i * width:(i + 1) * width]
            blocks.append(self.options[row.index(max(row))])  # the first of the highest scores
        weights = [[0.0] * n for _ in range(m)]
        densities = [[1.0] * n for _ in range(m)] if dens else None
        for i, choice in enumerate(blocks):
            for k, model in enumerate(self.models):
                if choice == "merge":
                    weights[k][i] = searched[k][i]
                    if densities:
                        densities[k][i] = dens[k]
                elif choice == model:
                    weights[k][i] = 1.0
        return weights, densities, blocks

    def config(self, x, base: str, seed: int) -> MergeConfig:
        """The merge config of x: per-model weights (and densities) as gradients of one value per block."""
        weights, densities, _ = self.decode(x)
        models = tuple(MergeModel(path, weight=weights[k], density=self._density(densities, k))
                       for k, path in enumerate(self.models))
        return MergeConfig(method=self.method, models=models, base=base, seed=seed)

    def _density(self, densities, k: int):
        if densities is None:
            return None
        if self.kind == "params":  # one per model
            return densities[k][0]
        return densities[k]

    def describe(self, x) -> dict:
        """What search.json records of a candidate: the models' weights and densities, the blocks' inputs."""
        weights, densities, blocks = self.decode(x)
        models = [{"model": path, "weight": weights[k], "density": self._density(densities, k)}
                  for k, path in enumerate(self.models)]
        return {"models": models, **({"blocks": blocks} if blocks is not None else {})}


# --- the inputs, read once ----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The base's and the models' tensors in memory, in the base's file order, and the base's config.json."""

    names: dict  # {name: stored dtype}
    base: dict  # {name: tensor}
    models: list[dict]  # [{name: tensor}], in the models' order
    config: dict
    n_layer: int


def load_inputs(template: MergeConfig) -> Inputs:
    """Every tensor of the base and the models (adapters as the base plus their task vector), through the
    driver's checks (architecture, tokenizer, shapes, quantized inputs)."""
    from .driver import open_sources

    sources, ref = open_sources(template)
    names = {name: dtype for name, (dtype, _) in ref.reader.entries.items()}
    base = sources[template.base]
    return Inputs(names=names, base={n: base.get(n, False) for n in names},
                  models=[{n: sources[m.model].get(n, False) for n in names} for m in template.models],
                  config=ref.config, n_layer=int(ref.config["model"]["n_layer"]))


def merged_state(cfg: MergeConfig, inputs: Inputs) -> dict:
    """{name: merged tensor} as the driver writes it (merge_tensors with method_parameters, cast to the base's
    stored dtype)."""
    import torch

    from .driver import method_parameters
    from .methods import merge_tensors

    state = {}
    for name, dtype in inputs.names.items():
        merged = merge_tensors(cfg.method, inputs.base[name], [m[name] for m in inputs.models],
                               method_parameters(cfg, name, inputs.n_layer), name=name, seed=cfg.seed)
        state[name] = merged.to(dtype if dtype.is_floating_point else torch.float32)
    return state


def model_from_state(config: dict, state: dict, device):
    """A GPT in float32 on `device` holding `state`, laid out for inference as load_for_inference lays it."""
    import torch

    from .. import kernels
    from ..checkpoint import model_config
    from ..model import GPT

    with torch.device("meta"):
        model = GPT(model_config(config, "the base's config.json"))
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}, assign=True,
                          strict=True)
    model.reset_rope(device=device)
    kernels.inference_layout(model.matrices())
    return model.eval()


# --- resuming -----------------------------------------------------------------------------------------------------


class Journal:
    """OUT.trials.jsonl: a line {"search": settings}, then one line per scored trial. A search with the same
    settings replays its trials in order while the candidates asked are the recorded ones."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.header = path, {"search": json.loads(json.dumps(settings))}
        self.entries = self._read()  # None: nothing to replay (no file, other settings)
        self.kept = 0  # entries confirmed so far (replayed, then added)
        self.replayed = 0

    def _read(self) -> list[dict] | None:
        if not self.path.is_file():
            return None
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed search
                break
        return lines[1:] if lines and lines[0] == self.header else None

    def recall(self, x: list[float]) -> dict | None:
        """The recorded trial of candidate x when it is the next one recorded."""
        if self.entries is not None and self.kept < len(self.entries) and self.entries[self.kept].get("x") == x:
            self.kept += 1
            self.replayed += 1
            return self.entries[self.kept - 1]
        return None

    def add(self, entry: dict) -> None:
        if self.entries is None or self.kept < len(self.entries):  # start over from the trials replayed
            self.entries = (self.entries or [])[:self.kept]
            self.path.write_text("".join(json.dumps(e) + "\n" for e in [self.header, *self.entries]),
                                 encoding="utf-8")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries.append(entry)
        self.kept += 1


# --- the search ---------------------------------------------------------------------------------------------------


def optimizer_class():
    """cmaes.CMA, or a ConfigError naming the extra that installs it."""
    try:
        from cmaes import CMA
    except ImportError:
        raise ConfigError(NEEDS_EXTRA) from None
    return CMA


def template(base: str | None, models: list[str], evals: list[str], cfg: SearchConfig) -> MergeConfig:
    """The inputs checked as a merge config (the candidates' weights filled in later)."""
    if not base:
        raise ConfigError("merge search merges task vectors: give the model the others were fine-tuned from "
                          "as --base")
    if not models:
        raise ConfigError("merge search needs the models to merge: give --model DIR (repeat for each)")
    if not evals:
        raise ConfigError("merge search scores candidates on task files: give --eval TASKS.jsonl (repeat for each)")
    for what, paths in (("--model", models), ("--eval", evals)):
        twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        if twice is not None:
            raise ConfigError(f"{what} {twice} is given twice; give each once")
    return MergeConfig(method=cfg.method, models=tuple(MergeModel(m) for m in models), base=base, seed=cfg.seed)


def search(base: str | None, models: list[str], evals: list[str], cfg: SearchConfig | None = None,
           out: str | Path = "search", force: bool = False, progress: Progress | None = None) -> dict:
    """Search the merge of `models` over `base` that scores best on the `evals` files (see the module's
    docstring); write it into `out` with search.json and trials.md. Returns a summary of the search."""
    cfg = cfg or SearchConfig()
    start = time.perf_counter()
    cma = optimizer_class()
    base_cfg = template(base, list(models), list(evals), cfg)
    out = Path(out)
    check_out(out, force, inputs=[*base_cfg.inputs, *evals])
    records = {p: read_eval(p, cfg.metric, cfg.limit) for p in evals}
    inputs = load_inputs(base_cfg)
    space = Space(cfg.space, cfg.method, tuple(models), inputs.n_layer)
    settings = {"base": base, "models": list(models), "evals": list(evals), **cfg.to_dict()}
    journal = Journal(out.with_name(out.name + JOURNAL_SUFFIX), {k: v for k, v in settings.items() if k != "trials"})
    trials, population = run_trials(space, cfg, candidate_scorer(space, base_cfg, inputs, records, cfg), journal,
                                     cma, progress)
    best = min(trials, key=lambda t: sign(cfg.metric) * t["objective"])
    settings.update(population=population, dim=space.dim, bounds=[list(b) for b in space.bounds()],
                    objective=f"mean {cfg.metric} over the eval files, {better(cfg.metric)} is better")
    document = {"settings": settings, "trials": trials, "best": best}
    write_output(out, force, space.config(best["x"], base, cfg.seed), document, [*base_cfg.inputs, *evals],
                 progress)
    journal.path.unlink(missing_ok=True)
    return {"out": str(out), "space": cfg.space, "method": cfg.method, "metric": cfg.metric, "trials": len(trials),
            "resumed": journal.replayed, "population": population,
            "dim": space.dim, "best_trial": best["trial"], "best_objective": best["objective"],
            "best_scores": best["scores"], "initial_objective": trials[0]["objective"],
            "seconds": time.perf_counter() - start}


def sign(metric: str) -> int:
    """+1 where the objective is minimised (loss), -1 where maximised (accuracy)."""
    return 1 if metric == "loss" else -1


def better(metric: str) -> str:
    return "lower" if metric == "loss" else "higher"


def candidate_scorer(space: Space, base_cfg: MergeConfig, inputs: Inputs, records: dict, cfg: SearchConfig):
    """x -> {"scores", "objective"}: merged in memory, loaded into a GPT, scored on every eval file."""
    from .. import kernels
    from ..checkpoint import model_config, model_tokenizer

    device = kernels.resolve_device(cfg.device)
    tok = model_tokenizer(base_cfg.base, inputs.config)
    scorer = Scorer(records, tok, model_config(inputs.config, base_cfg.base).block_size, cfg.metric)

    def evaluate(x) -> dict:
        state = merged_state(space.config(x, base_cfg.base, cfg.seed), inputs)
        return scorer(model_from_state(inputs.config, state, device))

    return evaluate


def run_trials(space: Space, cfg: SearchConfig, evaluate, journal: Journal, cma, progress: Progress | None):
    """(trials, population): trial 0 the space's mean, then CMA-ES generations until cfg.trials are scored (a
    generation cut short by the budget is not told)."""
    import numpy as np

    optimizer = cma(mean=np.array(space.mean()), sigma=cfg.sigma, bounds=np.array(space.bounds()), seed=cfg.seed,
                    population_size=cfg.population)
    trials: list[dict] = []

    def trial(x, generation: int) -> dict:
        x = [float(v) for v in x]
        entry = journal.recall(x)
        if entry is None:
            entry = {"trial": len(trials), "generation": generation, "x": x, **space.describe(x), **evaluate(x)}
            journal.add(entry)
        trials.append(entry)
        best = min(sign(cfg.metric) * t["objective"] for t in trials) * sign(cfg.metric)
        report(progress, "search", len(trials), cfg.trials, unit="trials",
               status=f"{cfg.metric} {entry['objective']:.4g}, best {best:.4g}")
        return entry

    trial(space.mean(), 0)
    generation = 0
    while len(trials) < cfg.trials:
        generation += 1
        asked = [optimizer.ask() for _ in range(optimizer.population_size)]
        told = []
        for x in asked[:cfg.trials - len(trials)]:
            told.append((x, sign(cfg.metric) * min(trial(x, generation)["objective"], 1e30)))
        if len(told) == len(asked):
            optimizer.tell(told)
    return trials, optimizer.population_size


# --- the output ---------------------------------------------------------------------------------------------------


def write_output(out: Path, force: bool, best: MergeConfig, document: dict, inputs: list[str],
                 progress: Progress | None) -> None:
    """out: the best merge (by the driver, so out/merge.json reruns it), search.json and trials.md, as one
    atomic directory."""
    from .driver import merge

    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        merge(best, tmp, force=True, progress=progress)  # replaces the empty temporary directory
        (tmp / SEARCH_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        (tmp / TRIALS_FILE).write_text(trials_markdown(document), encoding="utf-8")


def trials_markdown(document: dict) -> str:
    """trials.md: one row per trial (the best marked), the models named m1, m2... as listed above the table."""
    s, trials = document["settings"], document["trials"]
    labels = {path: f"m{k + 1}" for k, path in enumerate(s["models"])}
    files = list(s["evals"])
    lines = [f"# Merge search: {s['space']} space, {s['method']}, {s['objective']}", "",
             f"base: `{s['base']}`; " + ", ".join(f"{labels[p]}: `{p}`" for p in s["models"]), "",
             "| trial | generation | objective | " + " | ".join(f"`{Path(f).name}`" for f in files) + " | candidate |",
             "|---:|---:|---:|" + "---:|" * len(files) + "---|"]
    for t in trials:
        mark = " (best)" if t["trial"] == document["best"]["trial"] else ""
        scores = " | ".join(f"{t['scores'][f]:.4f}" for f in files)
        lines.append(f"| {t['trial']}{mark} | {t['generation']} | {t['objective']:.4f} | {scores} | "
                     f"{candidate_text(t, labels)} |")
    return "\n".join(lines) + "\n"


def candidate_text(entry: dict, labels: dict) -> str:
    """A candidate in one cell: the blocks' inputs, the weights per block, the densities."""
    parts = []
    if "blocks" in entry:
        parts.append("blocks " + " ".join(labels.get(b, b) for b in entry["blocks"]))
    if entry.get("blocks") is None or "merge" in entry["blocks"]:
        for m in entry["models"]:
            text = f"{labels[m['model']]} " + " ".join(f"{w:.2f}" for w in m["weight"])
            density = m["density"]
            if density is not None:
                shown = density if isinstance(density, list) else [density]
                text += " (density " + " ".join(f"{d:.2f}" for d in shown) + ")"
            parts.append(text)
    return "; ".join(parts)
