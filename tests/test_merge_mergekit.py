"""`lbdl merge` against mergekit (issue #14): the same merges of the same weights, tensor for tensor.

A base and three fine-tunes (the base plus seeded noise) of each family, GPT-2 and Llama, are saved by lbdl and
exported with `export_hf`; mergekit merges the exported directories through its Python API (`run_merge`, CPU,
float32), lbdl merges the lbdl directories through `lbdl merge` with the same settings, and mergekit's output is
imported back with `import_hf`. Every tensor of the two outputs is then compared (atol 1e-5, rtol 1e-5).

Where the result depends on how a layer is split into tensors, the GPT-2 family cannot be compared tensor for
tensor: transformers' GPT-2 keeps q, k and v as one fused `c_attn` matrix (and bias), lbdl as three. TIES keeps
the top `density` fraction of each task vector by magnitude *per tensor*, and SLERP takes one angle *per tensor*,
so mergekit trims / rotates the fused matrix where lbdl does q, k and v each. For those two methods on GPT-2 the
test compares every other tensor, checks that mergekit's fused `c_attn` is exactly lbdl's own method function
(`lbdl_cli.merge.methods`) applied to the fused matrix (so the whole difference is the split), and that lbdl's
q/k/v differ from it; the Llama family (separate q/k/v, as in transformers) is compared on every tensor. Linear,
task arithmetic, DARE at density 1 and passthrough are elementwise (or copies) and are compared on every tensor
of both families. GPT-2's Conv1D layout (the transpose) changes neither magnitudes nor norms.

DARE at density < 1 is not compared: both draw a random mask (lbdl's seeded per tensor name, mergekit's from
torch's global generator) and they rescale the survivors differently (lbdl by 1/density, as the paper; mergekit
by |delta|_1 / |masked delta|_1). At density 1 both keep every entry, so dare_linear is task arithmetic and
dare_ties is TIES without trimming in both tools: that is compared.

Passthrough (blocks 0-1 of one model, then 1-2 of another): every tensor is compared on both families; both
tools take the embeddings from the first slice's model and the tensors above the blocks (the final norm, Llama's
untied head) from the last slice's (mergekit's plan.py, post_weights).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from lbdl_cli.checkpoint import save_model
from lbdl_cli.checkpoint.hf import export_hf, import_hf

pytest.importorskip("mergekit")
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")  # mergekit's import

FAMILIES = ("gpt2", "llama")
N_LAYER = 3
WEIGHTS = (1.0, 0.5, 0.25)  # of the three fine-tunes; unequal, so that normalize and the sign election matter
QKV = ("q_proj", "k_proj", "v_proj")


def weights(d) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: root} with root/{base,ft1,ft2,ft3} (lbdl) and root/{...}-hf (their export)."""
    roots = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        for i, name in enumerate(("base", "ft1", "ft2", "ft3")):
            model = tiny_model(family=family, n_layer=N_LAYER)
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for p in model.parameters() if i else ():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
            save_model(model, root / name)
            export_hf(root / name, root / f"{name}-hf")
        roots[family] = root
    return roots


def run_mergekit(config: dict, out) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's run_merge of `config` (its YAML as a dict) on the CPU in float32, imported into lbdl."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate({"dtype": "float32", **config}), str(out / "mk-hf"), options)
    import_hf(out / "mk-hf", out / "mk")
    return weights(out / "mk")


def run_lbdl(cli, out, *args) -> dict[str, torch.Tensor]:
    r = cli("merge", *args, "--out", out / "lbdl")
    assert r.code == 0, r.err
    return weights(out / "lbdl")


def assert_same(ours: dict, theirs: dict, skip=lambda name: False) -> int:
    """Every tensor of `theirs` equal to `ours` within float32 rounding, but those `skip` names; the count."""
    assert ours.keys() == theirs.keys()
    compared = 0
    for name in ours:
        if not skip(name):
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
            compared += 1
    return compared


def fused_qkv(d, layer: int, kind: str) -> torch.Tensor:
    """An exported GPT-2's c_attn weight or bias of block `layer`, as stored (Conv1D: [C, 3C] / [3C])."""
    return weights(d)[f"transformer.h.{layer}.attn.c_attn.{kind}"]


def task_cases(root):
    """(name, mergekit config, lbdl merge args) of the methods over the base and the three fine-tunes."""
    fts = [root / f"ft{i}" for i in (1, 2, 3)]
    lbdl_models = [a for ft, w in zip(fts, WEIGHTS) for a in ("--model", ft, "--weight", w)]

    def mk(method, params=None, base=True):
        return {"merge_method": method, **({"base_model": str(root / "base-hf")} if base else {}),
                "parameters": params or {},
                "models": [{"model": str(root / f"ft{i}-hf"), "parameters": {"weight": w}}
                           for i, w in zip((1, 2, 3), WEIGHTS)]}

    base = ["--base", root / "base"]
    return {
        "linear": (mk("linear", base=False), ["--method", "linear", *lbdl_models]),
        "task_arithmetic": (mk("task_arithmetic", {"lambda": 0.7}),
                            [*base, "--method", "task_arithmetic", "--lambda", 0.7, *lbdl_models]),
        "dare_linear_density_1": (mk("dare_linear", {"density": 1.0}),
                                  [*base, "--method", "dare_linear", "--density", 1, *lbdl_models]),
        "dare_ties_density_1": (mk("dare_ties", {"density": 1.0}),
                                [*base, "--method", "dare_ties", "--density", 1, *lbdl_models]),
        "ties": (mk("ties", {"density": 0.5}), [*base, "--method", "ties", "--density", 0.5, *lbdl_models]),
        "ties_no_normalize": (mk("ties", {"density": 0.5, "normalize": False}),
                              [*base, "--method", "ties", "--density", 0.5, "--param", "normalize=false",
                               *lbdl_models]),
    }


SPLIT_DEPENDENT = {"ties", "ties_no_normalize"}  # per-tensor top-k: GPT-2's fused c_attn is compared apart


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "dare_linear_density_1", "dare_ties_density_1",
                                  "ties", "ties_no_normalize"])
def test_task_vector_methods_match_mergekit(cli, models, family, case, tmp_path):
    root = models[family]
    config, args = task_cases(root)[case]
    theirs = run_mergekit(config, tmp_path)
    ours = run_lbdl(cli, tmp_path, *args)
    if family == "llama" or case not in SPLIT_DEPENDENT:
        assert assert_same(ours, theirs) == len(ours)
        return
    assert assert_same(ours, theirs, skip=lambda n: n.split(".")[-2] in QKV) == len(ours) - 6 * N_LAYER
    from lbdl_cli.merge.methods import ties

    normalize = case == "ties"
    for layer in range(N_LAYER):
        for kind in ("weight", "bias"):
            inputs = [fused_qkv(root / f"{n}-hf", layer, kind) for n in ("base", "ft1", "ft2", "ft3")]
            expected = ties(inputs[0], inputs[1:], WEIGHTS, 0.5, normalize=normalize)
            torch.testing.assert_close(fused_qkv(tmp_path / "mk-hf", layer, kind), expected, atol=1e-5, rtol=1e-5)
    split_differs(ours, theirs)


def split_differs(ours: dict, theirs: dict) -> None:
    """lbdl's per-tensor q/k/v are not mergekit's fused result (the documented difference, not a rounding)."""
    differ = [n for n in ours if n.split(".")[-2] in QKV and not torch.allclose(ours[n], theirs[n], atol=1e-5)]
    assert any(n.endswith(".weight") for n in differ), "the split into q/k/v no longer changes the result"


@pytest.mark.parametrize("family", FAMILIES)
def test_slerp_matches_mergekit(cli, models, family, tmp_path):
    """SLERP from ft1 (t = 0) to ft2 at t = 0.3: mergekit's base_model is its t = 0 end, lbdl's first --model."""
    root = models[family]
    config = {"merge_method": "slerp", "base_model": str(root / "ft1-hf"), "parameters": {"t": 0.3},
              "models": [{"model": str(root / "ft1-hf")}, {"model": str(root / "ft2-hf")}]}
    theirs = run_mergekit(config, tmp_path)
    ours = run_lbdl(cli, tmp_path, "--method", "slerp", "--model", root / "ft1", "--model", root / "ft2", "--t", 0.3)
    if family == "llama":
        assert assert_same(ours, theirs) == len(ours)
        return
    assert assert_same(ours, theirs, skip=lambda n: n.split(".")[-2] in QKV) == len(ours) - 6 * N_LAYER
    from lbdl_cli.merge.methods import slerp

    for layer in range(N_LAYER):
        for kind in ("weight", "bias"):
            v0, v1 = (fused_qkv(root / f"{n}-hf", layer, kind) for n in ("ft1", "ft2"))
            torch.testing.assert_close(fused_qkv(tmp_path / "mk-hf", layer, kind), slerp([v0, v1], 0.3), atol=1e-5,
                                       rtol=1e-5)
    split_differs(ours, theirs)


def passthrough(cli, root, out) -> tuple[dict, dict]:
    """(lbdl's, mergekit's) stack of blocks 0-1 of ft1 then blocks 1-2 of ft2: 4 blocks."""
    config = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(root / "ft1-hf"), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(root / "ft2-hf"), "layer_range": [1, 3]}]}]}
    theirs = run_mergekit(config, out)
    ours = run_lbdl(cli, out, "--slice", f"{root / 'ft1'}:0:2", "--slice", f"{root / 'ft2'}:1:3")
    return ours, theirs


def above_the_blocks(name: str, family: str) -> bool:
    """The final norm, and the head where it is a tensor of its own (GPT-2's is the embedding, tied)."""
    return name.startswith("norm_f.") or (name == "lm_head.weight" and family == "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_passthrough_matches_mergekit_below_the_head(cli, models, family, tmp_path):
    """The stacked blocks and the embeddings (the first slice's model's) are mergekit's; the tensors above the
    blocks are compared in the next test."""
    root = models[family]
    ours, theirs = passthrough(cli, root, tmp_path)
    assert sum(n.startswith("blocks.3.") for n in ours) > 0 and not any(n.startswith("blocks.4.") for n in ours)
    above = sum(above_the_blocks(n, family) for n in ours)
    assert above == 2  # norm_f's weight and bias (GPT-2), norm_f's weight and the head (Llama)
    assert assert_same(ours, theirs, skip=lambda n: above_the_blocks(n, family)) == len(ours) - above
    ft1, ft2 = weights(root / "ft1"), weights(root / "ft2")
    assert torch.equal(ours["blocks.2.norm1.weight"], ft2["blocks.1.norm1.weight"])  # a copy, not a merge
    assert torch.equal(ours["tok_emb.weight"], ft1["tok_emb.weight"])
    # mergekit takes the tensors above the blocks from the last slice's model (plan.py, post_weights)
    for name in (n for n in ours if above_the_blocks(n, family)):
        torch.testing.assert_close(theirs[name], ft2[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_passthrough_head_matches_mergekit(cli, models, family, tmp_path):
    ours, theirs = passthrough(cli, models[family], tmp_path)
    assert assert_same(ours, theirs) == len(ours)
