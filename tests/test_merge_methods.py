"""The merge methods (lbdl_cli/merge/methods.py): known answers worked by hand, invariants, the registry's checks,
and parity with mergekit where it is installed."""

import hashlib
import importlib.metadata
import math

import pytest
import torch

from lbdl_cli.errors import ConfigError
from lbdl_cli.merge import (
    METHODS,
    dare_linear,
    dare_ties,
    describe,
    drop_generator,
    linear,
    merge_tensors,
    passthrough,
    slerp,
    sparsify,
    task_arithmetic,
    ties,
)


def T(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(a, b, tol=1e-6):
    return a.dtype == torch.float32 and a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=0)


# --- known answers ---

def test_linear_known_answer():
    a, b = T(1, 2), T(3, 6)
    assert close(linear([a, b], [1, 3]), T(2.5, 5))  # (1*1 + 3*3) / 4, (1*2 + 3*6) / 4
    assert close(linear([a, b], [1, 3], normalize=False), T(10, 20))
    assert close(merge_tensors("linear", None, [a, b], {}, "w"), T(2, 4))  # weight 1 each, normalized: the mean


def test_task_arithmetic_known_answer():
    base, t1, t2 = T(1, 2), T(2, 2), T(1, 5)  # tau1 = (1, 0), tau2 = (0, 3)
    assert close(task_arithmetic(base, [t1, t2], [1, -1], lambda_=2), T(3, -4))  # base + 2 (tau1 - tau2)
    assert close(task_arithmetic(base, [t1, t2], [1, 3], normalize=True), T(1.25, 4.25))  # base + (1, 9) / 4
    assert close(merge_tensors("task_arithmetic", base, [t1, t2], {}, "w"), T(2, 5))  # base + tau1 + tau2


# Three task vectors of 4 entries (base 0); density 0.5 keeps the 2 largest |tau| of each:
TAUS = [T(3, -1, 0.5, -2), T(2, 4, -0.5, 1.5), T(-2, -3, 1, 0.2)]
TRIMMED = [T(3, 0, 0, -2), T(2, 4, 0, 0), T(-2, -3, 0, 0)]


def test_magnitude_trim_keeps_the_largest_and_floors_the_count():
    for tau, trimmed in zip(TAUS, TRIMMED):
        assert close(sparsify(tau, 0.5, "magnitude"), trimmed)
        assert close(sparsify(tau, 0.7, "magnitude"), trimmed)  # int(0.7 * 4) = 2, as mergekit (not round: 3)
        assert close(sparsify(tau, 0.1, "magnitude"), trimmed * (trimmed.abs() == trimmed.abs().max()))  # 1, not 0
        assert close(sparsify(tau, 0.5, "magnitude", rescale=True), trimmed / 0.5)
        assert close(sparsify(tau, 1.0, "magnitude"), tau)


def test_ties_known_answer():
    base = T(10, 20, 30, 40)
    models = [base + tau for tau in TAUS]
    # weights 1: sums of the trimmed (3, 1, 0, -2) elect (+, +, +, -); entry 0: 3 and 2 agree, -2 does not -> 5/2;
    # entry 1: 4 agrees, -3 not -> 4; entry 2: every trimmed entry is 0, none agrees -> 0; entry 3: -2 -> -2.
    assert close(ties(base, models, [1, 1, 1], 0.5), base + T(2.5, 4, 0, -2))
    # weights (1, 2, 1): weighted (3, 0, 0, -2), (4, 8, 0, 0), (-2, -3, 0, 0) sum to (5, 5, 0, -2), the same signs;
    # entry 0: (3 + 4) / (1 + 2); entry 1: 8 / 2; entry 3: -2 / 1; lambda 0.5 halves it.
    expected = base + 0.5 * T(7 / 3, 4, 0, -2)
    assert close(ties(base, models, [1, 2, 1], 0.5, lambda_=0.5), expected)
    assert close(merge_tensors("ties", base, models, {"weight": [1, 2, 1], "density": 0.5, "lambda": 0.5}, "w"),
                 expected)
    # without normalize: the agreeing weighted entries summed, (7, 8, 0, -2)
    assert close(ties(base, models, [1, 2, 1], 0.5, normalize=False), base + T(7, 8, 0, -2))


def test_ties_negative_sum_elects_minus():
    base = T(0)
    # taus 1 and -3 (density 1): the sum -2 elects -, only -3 counts -> -3
    assert close(ties(base, [T(1), T(-3)], [1, 1]), T(-3))
    # a tied sum (2 - 2 = 0) elects + (mergekit's sum >= 0)
    assert close(ties(base, [T(2), T(-2)], [1, 1]), T(2))


def test_ties_density_one_with_agreeing_signs_is_the_mean_task_vector():
    base = T(1, -1, 2, 0.5)
    taus = [T(1, -2, 0.5, 3), T(2, -1, 0.25, 1), T(3, -0.5, 1, 2)]
    models = [base + tau for tau in taus]
    assert close(ties(base, models, [1, 1, 1]), base + sum(taus) / 3, 1e-5)


def test_slerp_known_answers():
    a, b = T(1, 0), T(0, 3)  # 90 degrees apart: sin((1 - t) pi/2) a + sin(t pi/2) b
    assert close(slerp([a, b], 1 / 3), T(math.sqrt(3) / 2, 1.5))
    assert close(slerp([a, b], 0.5), T(math.sqrt(0.5), 3 * math.sqrt(0.5)))
    assert close(slerp([a, b], 0.0), a) and close(slerp([a, b], 1.0), b)
    x, y = T(1, 2, -1), T(-2, 0.5, 4)
    assert close(slerp([x, y], 0.0), x) and close(slerp([x, y], 1.0), y)


def test_slerp_uses_the_angle_of_the_normalised_tensors():
    # (1, 0) and (1, 1) are 45 degrees apart whatever their lengths: scaling one scales its share only
    a, b = T(1, 0), T(1, 1)
    theta = math.pi / 4
    expected = (math.sin(0.7 * theta) * a + math.sin(0.3 * theta) * 5 * b) / math.sin(theta)
    assert close(slerp([a, 5 * b], 0.3), expected, 1e-5)


def test_slerp_of_parallel_or_antiparallel_tensors_is_lerp():
    a = T(1, 2, 3)
    for b in (2 * a, -3 * a, a + T(1e-4, 0, 0)):
        assert close(slerp([a, b], 0.25), 0.75 * a + 0.25 * b, 1e-6)


def test_slerp_falls_back_to_lerp_above_cos_0_9995():
    a = T(1, 0)
    for cos, is_lerp in ((0.9996, True), (0.9994, False)):
        phi = math.acos(cos)
        b = T(math.cos(phi), math.sin(phi))
        lerp = 0.5 * (a + b)  # shorter than the arc's midpoint by a factor cos(phi / 2), about 1 - 5e-5
        arc = T(math.cos(phi / 2), math.sin(phi / 2))
        assert close(slerp([a, b], 0.5), lerp if is_lerp else arc, 1e-6)
        assert not close(lerp, arc, 1e-5)


def test_passthrough_returns_its_input():
    x = torch.randn(3, 4)
    assert torch.equal(passthrough([x]), x)
    assert torch.equal(merge_tensors("passthrough", None, [x], {}, "w"), x)


# --- DARE ---

def test_dare_is_reproducible_per_seed_and_name():
    base = torch.zeros(64)
    models = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    one = dare_linear(base, models, [1, 1], 0.5, name="layers.0.w", seed=3)
    assert torch.equal(one, dare_linear(base, models, [1, 1], 0.5, name="layers.0.w", seed=3))
    assert not torch.equal(one, dare_linear(base, models, [1, 1], 0.5, name="layers.1.w", seed=3))
    assert not torch.equal(one, dare_linear(base, models, [1, 1], 0.5, name="layers.0.w", seed=4))
    params = {"density": 0.5}
    assert torch.equal(one, merge_tensors("dare_linear", base, models, params, "layers.0.w", seed=3))


def test_dare_mask_is_the_documented_generator():
    delta = torch.arange(1, 11, dtype=torch.float32)
    documented = int.from_bytes(hashlib.sha256(b"7:x").digest()[:8], "little")  # seed 7, tensor "x"
    keep = torch.rand(10, generator=torch.Generator().manual_seed(documented)) < 0.4
    assert torch.equal(keep, torch.rand(10, generator=drop_generator(7, "x")) < 0.4)
    assert close(dare_linear(torch.zeros(10), [delta], [1], 0.4, name="x", seed=7), delta * keep / 0.4)


def test_dare_keeps_about_density_and_rescales_the_survivors():
    base, model = torch.zeros(20_000), torch.full((20_000,), 2.0)
    out = dare_linear(base, [model], [1], 0.3, name="w", seed=0)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # 0.3 +- 4 standard deviations
    assert torch.all(out[kept] == 2.0 / 0.3)
    unscaled = dare_linear(base, [model], [1], 0.3, rescale=False, name="w", seed=0)
    assert torch.equal(unscaled != 0, kept) and torch.all(unscaled[kept] == 2.0)


def test_dare_expectation_is_the_task_vector():
    base = T(1, -1, 0.5, 2, 0, 3)
    model = base + T(0.5, -2, 1, 0.25, -1, 4)
    mean = torch.stack([dare_linear(base, [model], [1], 0.5, name="w", seed=s) for s in range(4000)]).mean(0)
    # each entry is base or base + 2 tau, equally likely: the standard error of the mean is |tau| / 63
    assert torch.allclose(mean, model, atol=0.3)
    assert not torch.allclose(mean, base, atol=0.3)


def test_dare_at_density_one_is_task_arithmetic_or_ties():
    base = torch.randn(5, 3)
    models = [base + torch.randn(5, 3) for _ in range(3)]
    ws = [0.5, 1.0, -0.25]
    assert close(dare_linear(base, models, ws, 1.0, name="w"), task_arithmetic(base, models, ws), 1e-6)
    assert close(dare_ties(base, models, ws, 1.0, name="w"), ties(base, models, ws, 1.0, normalize=False), 1e-6)


def test_dare_ties_elects_signs_after_the_drop():
    base = torch.zeros(200)
    models = [torch.full((200,), 1.0), torch.full((200,), -3.0)]
    out = dare_ties(base, models, [1, 1], 0.5, name="w", seed=1)
    g = drop_generator(1, "w")
    k1, k2 = torch.rand(200, generator=g) < 0.5, torch.rand(200, generator=g) < 0.5
    # dropped then rescaled: 2 k1 and -6 k2; -6 wins where it survived, else 2 where that survived, else 0
    expected = torch.where(k2, -6.0, torch.where(k1, 2.0, 0.0))
    assert close(out, expected)


# --- invariants ---

@pytest.mark.parametrize("method", list(METHODS))
def test_merging_identical_models_returns_the_model(method):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    m = METHODS[method]
    count = {"one": 1, "two": 2}.get(m.models, 3)
    base = x.clone() if m.needs_base else None
    params = {"density": 0.5} if any(p.name == "density" for p in m.params) else {}
    assert close(merge_tensors(method, base, [x.clone() for _ in range(count)], params, "w", seed=5), x, 1e-6)


def test_task_arithmetic_with_weight_zero_returns_the_base():
    base, model = torch.randn(3, 3), torch.randn(3, 3)
    assert torch.equal(task_arithmetic(base, [model], [0]), base)
    assert torch.equal(merge_tensors("task_arithmetic", base, [model], {"weight": 0}, "w"), base)


def test_results_are_float32_whatever_the_inputs():
    x = torch.randn(4, 4).to(torch.bfloat16)
    for method, m in METHODS.items():
        count = {"one": 1, "two": 2}.get(m.models, 2)
        out = merge_tensors(method, x if m.needs_base else None, [x + i for i in range(count)], {}, "w")
        assert out.dtype == torch.float32, method


# --- the registry and its checks ---

def test_registry_matches_mergekit_defaults():
    defaults = {name: {p.name: p.default for p in m.params} for name, m in METHODS.items()}
    assert defaults["linear"] == {"weight": 1.0, "normalize": True}
    assert defaults["task_arithmetic"] == {"weight": 1.0, "lambda": 1.0, "normalize": False}
    for name, normalize, rescale in (("ties", True, False), ("dare_linear", False, True), ("dare_ties", False, True)):
        assert defaults[name] == {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": normalize,
                                  "rescale": rescale}
    assert [m.name for m in METHODS.values() if m.needs_base] == ["task_arithmetic", "ties", "dare_linear",
                                                                  "dare_ties"]
    assert "arXiv:2306.01708" in METHODS["ties"].paper and "arXiv:2311.03099" in METHODS["dare_ties"].paper


def test_describe_lists_every_method_with_its_parameters():
    listed = {d["name"]: d for d in describe()}
    assert set(listed) == set(METHODS)
    density = next(p for p in listed["ties"]["params"] if p["name"] == "density")
    assert density == {"name": "density", "default": 1.0, "help": density["help"], "per_model": True,
                       "range": "(0, 1]"}
    assert listed["slerp"]["models"] == "two" and listed["ties"]["needs_base"] is True


def error(method, base, tensors, params=None, name="model.layers.0.w"):
    with pytest.raises(ConfigError) as e:
        merge_tensors(method, base, tensors, params or {}, name)
    return str(e.value)


def test_errors_name_the_problem():
    x = torch.zeros(2, 3)
    msg = error("tie", x, [x])
    assert "'tie'" in msg and "ties" in msg and "dare_linear" in msg
    assert "needs a base" in error("ties", None, [x])
    assert "takes no base" in error("linear", x, [x])
    assert "two" in error("slerp", None, [x, x, x]) and "got 3" in error("slerp", None, [x, x, x])
    assert "got 2" in error("passthrough", None, [x, x])
    assert "got 0" in error("linear", None, [])
    msg = error("ties", x, [x, torch.zeros(3, 2)])
    assert "'model.layers.0.w'" in msg and "(3, 2)" in msg and "(2, 3)" in msg and "model 1" in msg
    assert "'model.layers.0.w'" in error("linear", None, [x, torch.zeros(2)])


def test_parameter_errors_name_the_parameter():
    x = torch.zeros(4)
    msg = error("ties", x, [x], {"density": 0})
    assert "density" in msg and "(0, 1]" in msg
    assert "density" in error("dare_ties", x, [x, x], {"density": [0.5, 1.5]})
    assert "t must be in [0, 1]" in error("slerp", None, [x, x], {"t": 2})
    assert "normalize" in error("linear", None, [x], {"normalize": 1})
    assert "lambda" in error("ties", x, [x], {"lambda": float("nan")})
    msg = error("linear", None, [x], {"lamda": 1})
    assert "'lamda'" in msg and "weight" in msg
    assert "3 values for 2 models" in error("linear", None, [x, x], {"weight": [1, 2, 3]})
    assert "sum to 0" in error("linear", None, [x, x], {"weight": [1, -1]})


# --- parity with mergekit, where it is installed (not a dependency) ---

def test_parity_with_mergekit():
    sparse = pytest.importorskip("mergekit.sparsify")
    version = tuple(int(v) for v in importlib.metadata.version("mergekit").split(".")[:3] if v.isdigit())
    if version < (0, 1, 5):
        pytest.skip("the parity test calls mergekit 0.1.5's slerp (batched over outputs)")
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    g = torch.Generator().manual_seed(0)
    for shape in ((7,), (5, 9)):
        x = torch.randn(shape, generator=g)
        for density in (0.1, 0.5, 0.9):
            assert torch.equal(sparse.magnitude(x, density), sparsify(x, density, "magnitude"))
        for y in (torch.randn(shape, generator=g), -2 * x, x + 1e-3):
            for t in (0.0, 0.3, 1.0):
                expected = mk_slerp(torch.tensor([t]), x[None], y[None])[0]  # a batch of one output
                assert torch.allclose(expected, slerp([x, y], t), atol=1e-5)
        base, deltas = torch.randn(shape, generator=g), torch.randn((3, *shape), generator=g)
        ws = [1.0, 0.5, -0.25]
        w = torch.tensor(ws).view(3, *[1] * len(shape))
        trimmed = torch.stack([sparse.magnitude(d, 0.5) for d in deltas]) * w
        mask = get_mask(trimmed, method="sum", mask_dtype=torch.float32)
        divisor = (w * mask).sum(0)
        expected = base + (trimmed * mask).sum(0) / torch.where(divisor == 0, 1.0, divisor)
        assert torch.allclose(ties(base, list(base + deltas), ws, 0.5), expected, atol=1e-5)


def test_the_config_names_the_registry_s_methods():
    from lbdl_cli.merge import METHOD_NAMES, METHODS

    assert METHOD_NAMES == tuple(METHODS)  # config.py (torch-free) spells the names the registry defines
