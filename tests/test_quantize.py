"""lbdl_cli/quantize.py: the configs, quantizing a directory, the sweep's one pass per model against the
old three passes, the reference's top-k bound, progress, and the plot's extra."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_round_trips, tiny_model

from lbdl_cli.checkpoint import load_model, model_info, save_model
from lbdl_cli.cli.options import build
from lbdl_cli.errors import ConfigError, OutputExistsError
from lbdl_cli.evaluate import MAX_LOGITS, perplexity, windows
from lbdl_cli.progress import collect
from lbdl_cli.quantize import QuantizeConfig, Reference, SweepConfig, quantize_dir, run_sweep
from quant.formats import FORMATS, QuantError
from quant.linear import quantize_model
from quant.recipe import RECIPES, plan

# --- configs -----------------------------------------------------------------------------------------

CONFIGS = [
    QuantizeConfig(type="q4_k"),
    QuantizeConfig(type="Q4_1", recipe="m", embeddings="keep", calibrate="calib.txt", context=16),
    SweepConfig(),
    SweepConfig(types=("q8_0", "nf4"), recipes=("pure", "l"), embeddings="same", calibrate="c.txt", context=32,
                batch_size=2, compute_dtype="float32"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: repr(c))
def test_configs_round_trip_through_a_dict_and_toml(cfg):
    assert_round_trips(cfg)


@pytest.mark.parametrize("cls, fields", [(QuantizeConfig, {"type": "q4_0"}), (SweepConfig, {})])
def test_an_unknown_key_is_refused_by_name(cls, fields):
    with pytest.raises(ConfigError, match="unknown key 'bits'"):
        cls.from_dict({**fields, "bits": 4})


def test_types_and_recipes_from_commas_and_repeated_flags_alike():
    cfg = build(SweepConfig, {"types": ["q4_0,Q8_0", "q4_k", "q4_0"], "recipes": ["pure, m"], "batch_size": None})
    assert cfg.types == ("q4_0", "q8_0", "q4_k") and cfg.recipes == ("pure", "m") and cfg.batch_size == 8
    assert SweepConfig.from_dict({"types": ["q8_0,q4_0"]}) == SweepConfig(types=("q8_0", "q4_0"))
    assert SweepConfig().types == () and SweepConfig().compute_dtype == "auto"  # every type, the stored precision


def test_choices_come_from_the_formats_and_recipes():
    import dataclasses

    meta = {f.name: f.metadata for f in dataclasses.fields(SweepConfig)}
    assert meta["types"]["choices"] == tuple(FORMATS) and meta["recipes"]["choices"] == tuple(RECIPES)
    assert set(FORMATS) < set(meta["embeddings"]["choices"])


def test_bad_configs_name_the_value():
    with pytest.raises(QuantError, match="unknown quantization type 'q7'; valid types: q8_0, q5_1"):
        SweepConfig(types=("q8_0,q7",))
    with pytest.raises(QuantError, match="unknown recipe 'xl'; valid recipes: pure, s, m, l"):
        QuantizeConfig(type="q4_0", recipe="xl")
    with pytest.raises(ConfigError, match="quantize config: type is required; choose one of q8_0, q5_1"):
        QuantizeConfig.from_dict({})
    with pytest.raises(ConfigError, match="batch_size must be in \\[1, 65536\\], got 0"):
        SweepConfig(batch_size=0)
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, bfloat16, got 'f64'"):
        SweepConfig(compute_dtype="f64")


# --- a model directory -------------------------------------------------------------------------------


def test_quantize_dir_writes_a_safetensors_model_directory(tmp_path):
    save_model(tiny_model(n_embd=64), tmp_path / "fp", sections={"source": {"preset": "x"}})
    events = []
    result = quantize_dir(tmp_path / "fp", tmp_path / "q", QuantizeConfig(type="q4_1", recipe="m"),
                          progress=collect(events))
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    section = config["quantization"]
    assert config["format_version"] == 1 and config["source"] == {"preset": "x"}
    assert section["name"] == "Q4_1_M" and section["tensors"]["blocks.1.attn.v_proj.weight"] == "q5_1"
    info = model_info(tmp_path / "q")
    assert info["bits_per_weight"] == pytest.approx(result["bits_per_weight"])
    assert section["bits_per_weight"] == pytest.approx(result["bits_per_weight"], abs=1e-4)
    assert info["params"] == tiny_model(n_embd=64).num_params()
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["blocks.0.mlp.up_proj.weight"] == "q4_1" and types["blocks.0.norm1.weight"] == "F32"
    assert {t["name"]: t["type"] for t in result["tensors"]}["blocks.0.norm1.weight"] == "F32"
    assert {t["name"]: t["shape"] for t in info["tensors"]}["blocks.0.mlp.up_proj.weight"] == [256, 64]
    assert result["weights_bytes"] < 0.25 * result["original_bytes"]
    # progress: one event per quantized tensor, absolute counts of a known total
    n = len(section["tensors"])
    assert {(e.stage, e.unit, e.total) for e in events} == {("quantizing", "tensors", n)}
    assert [e.done for e in events] == list(range(n + 1)) and [e.status for e in events[1:]] == list(section["tensors"])
    with pytest.raises(QuantError, match="already quantized \\(Q4_1_M\\)"):
        quantize_dir(tmp_path / "q", tmp_path / "qq", QuantizeConfig(type="q4_0"))
    assert not (tmp_path / "qq").exists()


def test_calibrated_quantization_is_recorded(tmp_path):
    from tokenizer import train

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    (tmp_path / "t.txt").write_text(text)
    tok = train([tmp_path / "t.txt"], vocab_size=300, out=tmp_path / "tok")
    save_model(tiny_model(vocab_size=300, n_embd=64), tmp_path / "fp", tokenizer=tmp_path / "tok" / "tokenizer.model")
    result = quantize_dir(tmp_path / "fp", tmp_path / "q", QuantizeConfig(type="q4_0", calibrate=tmp_path / "t.txt",
                                                                          context=16))
    assert result["calibration"]["tokens"] >= 16 and tok.vocab_size == 300
    _, config = load_model(tmp_path / "q")
    assert config["quantization"]["calibration"]["ctx"] == 16
    plain = quantize_dir(tmp_path / "fp", tmp_path / "q2", QuantizeConfig(type="q4_0"))
    assert plain["calibration"] is None
    a = (tmp_path / "q" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "q2" / "model.safetensors").read_bytes()  # the importance changed the search


# --- the sweep: one pass per model, the same numbers as three --------------------------------------------


def old_divergence(base, model, ids, ctx: int, batch_size: int = 8) -> dict:
    """The sweep's KL divergence before the reference was kept: base and model both run again."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    first = ctx // 2
    spans = windows(len(ids), ctx)
    rows = max(1, min(batch_size, MAX_LOGITS // ((ctx - first) * base.config.vocab_size)))
    kl_sum, same, count = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(spans), rows):
            x = torch.stack([ids[s:s + ctx] for s, _ in spans[i:i + rows]])
            lp = F.log_softmax(base(x)[:, first:-1].float(), dim=-1)
            lq = F.log_softmax(model(x)[:, first:-1].float(), dim=-1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            count += lp.shape[0] * lp.shape[1]
    return {"kld": kl_sum / count, "same_top": same / count}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A tiny float model (context 64) with a small tokenizer, an evaluation text and the ids it encodes to."""
    from tokenizer import Tokenizer, train

    root = tmp_path_factory.mktemp("sweep")
    text = "".join(f"Citizen {i}: we proceed, {i * 7 % 13} times, before any further word.\n" for i in range(60))
    (root / "eval.txt").write_text(text)
    tok = train([root / "eval.txt"], vocab_size=300, out=root / "tok")
    save_model(tiny_model(vocab_size=tok.vocab_size, block_size=64, n_embd=64), root / "fp",
               tokenizer=root / "tok" / "tokenizer.model")
    return root, Tokenizer.load(root / "fp").encode(text)


def test_the_sweep_gives_the_numbers_of_the_three_pass_method(fp_dir, tmp_path):
    root, ids = fp_dir
    events = []
    cfg = SweepConfig(types=("q8_0", "q4_0"), recipes=("pure", "m"), batch_size=3)
    result = run_sweep(root / "fp", root / "eval.txt", cfg, progress=collect(events))
    assert result["reference"]["logprobs"] == "full" and result["reference"]["bytes"] > 0
    base, _ = load_model(root / "fp")
    ref = perplexity(base, ids, 64, batch_size=3)
    assert result["baseline"]["perplexity"] == ref["perplexity"] and result["baseline"]["kld"] == 0
    assert result["baseline"]["std_error"] == ref["std_error"] and result["tokens"] == ref["tokens"]
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    names = []
    for row in result["rows"]:
        variant = quantize_model(copy.deepcopy(base), plan(shapes, row["type"], row["recipe"]).types)
        old = {**perplexity(variant, ids, 64, batch_size=3), **old_divergence(base, variant, ids, 64, batch_size=3)}
        for key in ("perplexity", "std_error", "kld", "same_top"):
            assert row[key] == pytest.approx(old[key], rel=1e-9, abs=0), (row["name"], key)
        assert row["delta"] == pytest.approx(old["perplexity"] - ref["perplexity"], rel=1e-9)
        names.append(row["name"])
    assert names == ["Q8_0", "Q4_0", "Q4_0_M"]  # q8_0's m is q8_0 pure: left out
    # progress: variants of a known total, each named as its turn comes
    assert {(e.stage, e.unit, e.total) for e in events} == {("sweep", "variants", 3)}
    assert [e.done for e in events] == [0, 0, 1, 2, 3] and events[-1].done == events[-1].total
    assert [e.status for e in events[1:-1]] == names


def peaked_pair():
    """A tiny model whose predictions are peaked (as a trained model's are), and a quantized copy."""
    model = tiny_model(family="llama", block_size=64, n_embd=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return model, quantize_model(copy.deepcopy(model), plan(shapes, "q4_0").types)


def test_the_top_k_reference_gives_a_lower_bound_of_the_kl_divergence():
    model, variant = peaked_pair()
    ids = torch.randint(0, 97, (640,), generator=torch.Generator().manual_seed(0))
    full = Reference(model, ids, 64, batch_size=4)
    top = Reference(model, ids, 64, batch_size=4, budget=0, top_k=16)
    assert full.full and not top.full and top.nbytes < full.nbytes / 2
    a, b = full.score(variant), top.score(variant)
    assert a["kld"] > 1e-4
    assert 0.97 * a["kld"] <= b["kld"] <= a["kld"] * (1 + 1e-6)  # lumping the tail never raises KL (rounding aside)
    assert b["same_top"] == a["same_top"] and b["perplexity"] == a["perplexity"] and b["nll"] == a["nll"]
    untimed = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}  # noqa: E731
    assert untimed(full.result) == untimed(perplexity(model, ids, 64, batch_size=4))  # the reference's own pass


def test_a_model_is_at_zero_divergence_from_itself():
    model, variant = peaked_pair()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1))
    for budget in (None, 0):
        ref = Reference(model, ids, 64, **({} if budget is None else {"budget": 0, "top_k": 8}))
        same = ref.score(model)
        assert same["kld"] == pytest.approx(0, abs=1e-9) and same["same_top"] == 1
        assert same["perplexity"] == ref.result["perplexity"]
        assert ref.score(variant)["kld"] > 1e-6


def test_the_sweep_writes_its_files_atomically(fp_dir, tmp_path):
    root, _ = fp_dir
    cfg = SweepConfig(types=("q8_0",), recipes=("pure",))
    result = run_sweep(root / "fp", root / "eval.txt", cfg, out=tmp_path / "s")
    assert result["files"] == [str(tmp_path / "s" / f) for f in ("sweep.json", "sweep.md", "sweep.png")]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"] == result["rows"]
    assert "| Q8_0 |" in (tmp_path / "s" / "sweep.md").read_text()
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputExistsError, match="already exists"):
        run_sweep(root / "fp", root / "missing.txt", cfg, out=tmp_path / "s")  # refused before any work


def test_without_matplotlib_the_sweep_with_out_fails_before_it_runs(fp_dir, tmp_path, monkeypatch):
    root, _ = fp_dir
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lbdl\[plot\]'"):
        run_sweep(root / "fp", root / "missing.txt", SweepConfig(), out=tmp_path / "s")  # not the missing file
    assert not tmp_path.joinpath("s").exists()
