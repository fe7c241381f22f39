"""`lbdl quantize` and `lbdl quantize sweep`: outputs, what loads them, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from lbdl_cli.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A tiny float model (context 64) with a small tokenizer, and a text to score."""
    from tokenizer import train

    root = tmp_path_factory.mktemp("quant")
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:30_000]
    (root / "train.txt").write_text(text)
    (root / "eval.txt").write_text(text[-3000:])
    tok = train([root / "train.txt"], vocab_size=400, out=root / "tok")
    torch.manual_seed(0)
    save_model(tiny_model(vocab_size=tok.vocab_size, block_size=64, n_embd=64), root / "fp",
               tokenizer=root / "tok" / "tokenizer.model")
    return root


def test_quantize_then_info_shows_types_and_bits(cli, fp_dir, tmp_path):
    r = cli("quantize", fp_dir / "fp", "--type", "q4_1", "--recipe", "m", "--out", tmp_path / "q", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["name"] == "Q4_1_M" and 4.5 < out["bits_per_weight"] < 8 and out["kept"] == {}
    r = cli("info", tmp_path / "q", "--json")
    info = r.json()
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["blocks.0.attn.q_proj.weight"] == "q4_1" and types["blocks.0.attn.v_proj.weight"] == "q5_1"
    assert types["tok_emb.weight"] == "q8_0" and info["bits_per_weight"] == pytest.approx(out["bits_per_weight"])
    r = cli("info", tmp_path / "q")
    assert r.code == 0 and "bits per weight" in r.out and "q5_1" in r.out and "blocks.1.mlp.down_proj.weight" in r.out
    r = cli("quantize", fp_dir / "fp", "--type", "q8_0", "--out", tmp_path / "q8")
    assert r.code == 0 and "Q8_0" in r.out and "bits per weight" in r.out


def test_generate_and_eval_load_the_quantized_directory(cli, fp_dir, tmp_path):
    from lbdl_cli.evaluate import perplexity_of_file
    from lbdl_cli.sample import SamplingConfig, generate, load_for_inference
    from quant.linear import QuantLinear

    assert cli("quantize", fp_dir / "fp", "--type", "q8_0", "--out", tmp_path / "q8").code == 0
    model, tok, config = load_for_inference(tmp_path / "q8", None, "cpu")
    assert isinstance(model.blocks[0].mlp.up_proj, QuantLinear) and config["quantization"]["type"] == "q8_0"
    out = generate(model, tok, "First", SamplingConfig(max_new_tokens=5, temperature=0.0))
    assert out[0].new_tokens == 5
    fp = perplexity_of_file(fp_dir / "fp", fp_dir / "eval.txt")["perplexity"]
    q8 = perplexity_of_file(tmp_path / "q8", fp_dir / "eval.txt")["perplexity"]
    assert abs(q8 / fp - 1) < 0.01  # 8 bits cost (almost) nothing


def test_sweep_table_json_and_plot(cli, fp_dir, tmp_path):
    r = cli("quantize", "sweep", fp_dir / "fp", "--eval", fp_dir / "eval.txt", "--types", "q8_0,q4_0",
            "--recipes", "pure,m", "--calibrate", fp_dir / "train.txt", "--out", tmp_path / "s", "--json")
    assert r.code == 0, r.err
    res = r.json()
    names = [row["name"] for row in res["rows"]]
    # q8_0 m equals q8_0 pure, so it is skipped
    assert names == ["Q8_0", "Q8_0+imatrix", "Q4_0", "Q4_0+imatrix", "Q4_0_M", "Q4_0_M+imatrix"]
    base = res["baseline"]
    assert base["name"] == "F32" and base["bits_per_weight"] == 32
    for row in res["rows"]:
        assert row["size_bytes"] < base["size_bytes"]
        assert row["delta"] == pytest.approx(row["perplexity"] - base["perplexity"])
    by_name = {row["name"]: row for row in res["rows"]}
    assert 0 < by_name["Q8_0"]["kld"] < by_name["Q4_0"]["kld"]  # fewer bits move the predictions more
    assert by_name["Q8_0"]["same_top"] > 0.9 and base["kld"] == 0 and base["same_top"] == 1
    rtn = next(r for r in res["rows"] if r["name"] == "Q4_0")
    cal = next(r for r in res["rows"] if r["name"] == "Q4_0+imatrix")
    assert cal["removed"] == pytest.approx((rtn["perplexity"] - cal["perplexity"]) / rtn["delta"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Q4_0_M |" in (tmp_path / "s" / "sweep.md").read_text()
    r = cli("quantize", "sweep", fp_dir / "fp", "--eval", fp_dir / "eval.txt", "--types", "q8_0", "--types", "q4_0",
            "--recipes", "pure")  # repeated flags as well as commas
    assert r.code == 0 and "perplexity" in r.out and "Q8_0" in r.out and "Q4_0" in r.out and "F32" in r.out


def _missing_tensor(fp_dir: Path, tmp: Path) -> Path:
    import shutil

    shutil.copytree(fp_dir / "fp", tmp / "broken")
    state = load_file(tmp / "broken" / "model.safetensors")
    del state["blocks.1.mlp.up_proj.weight"]
    save_file(state, tmp / "broken" / "model.safetensors")
    return tmp / "broken"


def _quantized(fp_dir: Path, tmp: Path) -> Path:
    from lbdl_cli.quantize import QuantizeConfig, quantize_dir

    quantize_dir(fp_dir / "fp", tmp / "already", QuantizeConfig(type="q4_0"))
    return tmp / "already"


BAD = {
    "already quantized": (lambda fp, tmp: ["quantize", _quantized(fp, tmp), "--type", "q4_0"],
                          "already quantized (Q4_0); quantize the full-precision model"),
    "no type": (lambda fp, tmp: ["quantize", fp / "fp"], "type is required; choose one of q8_0, q5_1"),
    "unknown type": (lambda fp, tmp: ["quantize", fp / "fp", "--type", "q3_k"],
                     "unknown quantization type 'q3_k'; valid types: q8_0, q5_1, q5_0, q4_1, q4_0, q5_k, q4_k, nf4"),
    "unknown recipe": (lambda fp, tmp: ["quantize", fp / "fp", "--type", "q4_0", "--recipe", "xs"],
                       "unknown recipe 'xs'; valid recipes: pure, s, m, l"),
    "unknown embeddings": (lambda fp, tmp: ["quantize", fp / "fp", "--type", "q4_0", "--embeddings", "f8"],
                           "unknown embeddings type 'f8'; valid: keep, same, q8_0"),
    "missing tensors": (lambda fp, tmp: ["quantize", _missing_tensor(fp, tmp), "--type", "q4_0"],
                        "missing tensor(s) blocks.1.mlp.up_proj.weight"),
    "short calibration": (lambda fp, tmp: ["quantize", fp / "fp", "--type", "q4_0", "--calibrate",
                                           _write(tmp / "c.txt", "Too short.")],
                          "tokens, fewer than one window of 64"),
    "sweep unknown type": (lambda fp, tmp: ["quantize", "sweep", fp / "fp", "--eval", fp / "eval.txt", "--types", "q7"],
                           "unknown quantization type 'q7'"),
    "sweep bad batch": (lambda fp, tmp: ["quantize", "sweep", fp / "fp", "--eval", fp / "eval.txt", "--batch-size",
                                         "0"], "batch_size must be in [1, 65536], got 0"),
    "sweep of a quantized model": (lambda fp, tmp: ["quantize", "sweep", _quantized(fp, tmp), "--eval",
                                                    fp / "eval.txt"], "already quantized"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli, fp_dir, tmp_path, case):
    make, message = BAD[case]
    args = make(fp_dir, tmp_path) + ["--out", tmp_path / "out"]
    r = cli(*args)
    assert r.code == 2, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbdl: error: ") and message in lines[0], r.err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary sibling left
