"""quant/recipe.py and quant/calibrate.py: which tensor gets which type, sizes, importance (directories:
test_quantize.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import tiny_model

from quant.calibrate import importance_from_ids
from quant.formats import QuantError
from quant.recipe import plan, summarize


def shapes_of(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


LLAMA = shapes_of(tiny_model(family="llama", n_embd=64))  # intermediate 192, untied head


def types_by_role(p) -> dict:
    out = {}
    for name, t in p.types.items():
        key = name.split(".")[-2] if name.startswith("blocks.") else name
        out.setdefault(key, set()).add(t)
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("recipe,more", [("pure", set()), ("s", {"v_proj"}), ("m", {"v_proj", "down_proj"}),
                                         ("l", {"v_proj", "down_proj", "up_proj", "gate_proj"})])
def test_recipes_give_attention_v_and_feed_forward_more_bits(recipe, more):
    p = plan(LLAMA, "q4_0", recipe)
    roles = types_by_role(p)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert roles[proj] == (["q5_0"] if proj in more else ["q4_0"]), proj
    assert roles["tok_emb.weight"] == ["q8_0"] and roles["lm_head.weight"] == ["q8_0"]
    assert p.name == ("Q4_0" if recipe == "pure" else f"Q4_0_{recipe.upper()}") and not p.kept
    assert not any(k.endswith(("bias", "norm1.weight", "norm_f.weight")) for k in p.types)


def test_step_up_keeps_the_family():
    assert types_by_role(plan(LLAMA, "q4_1", "s"))["v_proj"] == ["q5_1"]
    assert types_by_role(plan(LLAMA, "q5_1", "s"))["v_proj"] == ["q8_0"]
    assert types_by_role(plan(LLAMA, "q8_0", "l"))["down_proj"] == ["q8_0"]


def test_embeddings_option():
    assert "tok_emb.weight" not in plan(LLAMA, "q4_0", embeddings="keep").types
    assert plan(LLAMA, "q4_1", embeddings="same").types["lm_head.weight"] == "q4_1"
    assert plan(LLAMA, "q4_1", embeddings="nf4").types["tok_emb.weight"] == "nf4"
    gpt2 = shapes_of(tiny_model(n_embd=64))
    assert "pos_emb.weight" not in plan(gpt2, "q4_0").types  # positions stay in full precision
    with pytest.raises(QuantError, match="unknown embeddings type 'q9'; valid: keep, same, q8_0"):
        plan(LLAMA, "q4_0", embeddings="q9")


def test_tensors_that_do_not_fit_the_block_stay_float_and_are_reported():
    p = plan(LLAMA, "q4_k")  # inner sizes 64 and 192: not multiples of 256
    assert set(p.types) == {"tok_emb.weight", "lm_head.weight"}  # q8_0, blocks of 32
    assert p.kept["blocks.0.mlp.down_proj.weight"] == "inner size 192 is not a multiple of q4_k's block size 256"
    assert len(p.kept) == 2 * 7


def test_unknown_type_and_recipe_list_the_valid_ones():
    with pytest.raises(QuantError, match="unknown quantization type 'q2_k'; valid types: q8_0, q5_1, q5_0, q4_1, "
                                         "q4_0, q5_k, q4_k, nf4, nf4_dq"):
        plan(LLAMA, "q2_k")
    with pytest.raises(QuantError, match="unknown recipe 'xl'; valid recipes: pure, s, m, l"):
        plan(LLAMA, "q4_0", "xl")


def test_bits_per_weight_known_answer():
    shapes = {"a.weight": (64, 64), "a.bias": (64,)}
    stats = summarize(shapes, {"a.weight": 4, "a.bias": 4}, {"a.weight": "q4_0"})
    assert stats["params"] == 4160 and stats["weights_bytes"] == 64 * 2 * 18 + 256
    assert stats["bits_per_weight"] == pytest.approx(8 * 2560 / 4160)
    assert stats["quantized_bits_per_weight"] == 4.5


def test_importance_is_the_mean_squared_input_of_each_column():
    torch.manual_seed(0)
    model = tiny_model(n_embd=64)
    ids = torch.randint(0, 97, (96,))
    seen = {}
    model.blocks[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0]))
    importance, info = importance_from_ids(model, ids, ctx=32, batch_size=2)
    assert info == {"tokens": 96, "windows": 3, "ctx": 32}
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]])
    assert torch.allclose(importance["blocks.1.mlp.down_proj.weight"], (x * x).mean(0), rtol=1e-5)
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(importance) == linear_names | {"tok_emb.weight"}  # the tied head's input: the final norm
    assert importance["tok_emb.weight"].shape == (64,)
