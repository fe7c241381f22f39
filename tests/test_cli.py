"""The command line: exit codes, one-line errors, --json, no torch at start-up."""

import json
import os
import subprocess
import sys

import pytest

from lbdl_cli import __version__


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lbdl_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from lbdl_cli.cli import main\n"
            "for args in (['--help'], ['--version'], ['quantize', '--help'], ['quantize', 'sweep', '--help'],\n"
            "             ['generate', '--help'], ['train', '--help'], ['init', '--help'],\n"
            "             ['eval', 'task', '--help'], ['finetune', '--help'], ['lora', 'merge', '--help']):\n"
            "    try:\n"
            "        main(args)\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (args, e.code)\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]


def test_version_and_help(cli):
    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"lbdl {__version__}"
    r = cli("--help")
    assert r.code == 0
    for command in ("info", "init", "presets", "import", "export"):
        assert command in r.out


def test_usage_error_exits_2(cli):
    r = cli("info")
    assert r.code == 2 and "Missing argument" in r.err


def test_library_error_is_one_line_exit_2(tmp_path):
    r = run("info", tmp_path / "missing")
    assert r.returncode == 2
    assert r.stderr.strip() == f"lbdl: error: model directory {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in r.stderr


def test_unexpected_failure_is_one_line_exit_1(cli, monkeypatch, model_dir):
    import lbdl_cli.checkpoint

    def broken(path):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(lbdl_cli.checkpoint, "model_info", broken)
    monkeypatch.delenv("LBDL_DEBUG", raising=False)
    r = cli("info", model_dir)
    assert r.code == 1
    assert r.err.strip().splitlines() == [
        "lbdl: failed: RuntimeError: something broke (set LBDL_DEBUG=1 for the traceback)"]


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    r = run("info", tmp_path / "missing", env={"LBDL_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr and "CheckpointError" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"lbdl: error: model directory {tmp_path / 'missing'} does not exist"
    r = run("train", "--max-steps", "many", env={"LBDL_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_init_info_json(cli, tmp_path):
    r = cli("init", "--preset", "nano", "--out", tmp_path / "m", "--vocab-size", 300, "--json")
    assert r.code == 0
    created = r.json()
    from lbdl_cli.checkpoint import load_preset
    from lbdl_cli.model import count_params

    assert created["params"] == count_params(load_preset("nano")[0].replace(vocab_size=300))
    assert abs(created["initial_loss"] - created["ln_vocab"]) < 0.1
    r = cli("info", tmp_path / "m", "--json")
    info = r.json()
    assert info["params"] == created["params"] and info["model"]["vocab_size"] == 300
    r = cli("info", tmp_path / "m")
    assert r.code == 0 and "parameters" in r.out and "layernorm" in r.out


def test_init_refuses_existing_output_and_writes_nothing(cli, tmp_path):
    assert cli("init", "--preset", "nano", "--out", tmp_path / "m").code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("init", "--preset", "nano", "--out", tmp_path / "m")
    assert r.code == 2 and "already exists" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("init", "--preset", "nope", "--out", tmp_path / "n")
    assert r.code == 2 and "valid presets:" in r.err
    r = cli("init", "--preset", "nano", "--out", tmp_path / "n", "--dtype", "float64")
    assert r.code == 2 and "dtype must be one of auto, float32, bfloat16" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_presets_json(cli):
    r = cli("presets", "--json")
    names = {p["name"]: p for p in r.json()["presets"]}
    assert names["gpt2-124m"]["params"] == 124_439_808
    assert names["llama-tiny"]["model"]["n_kv_head"] == 2


def test_import_export_commands(cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0))
    hf.save_pretrained(tmp_path / "hf")
    r = cli("import", tmp_path / "hf", "--out", tmp_path / "m", "--json")
    assert r.code == 0 and r.json()["architecture"] == "LlamaForCausalLM"
    r = cli("export", tmp_path / "m", "--to", "onnx", "--out", tmp_path / "x")
    assert r.code == 2 and "to must be one of hf, gguf, got 'onnx'" in r.err
    r = cli("export", tmp_path / "m", "--to", "hf", "--out", tmp_path / "hf2", "--json")
    assert r.code == 0 and r.json()["architecture"] == "LlamaForCausalLM"
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["num_key_value_heads"] == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,says", [
    (["init", "--preset", "nano", "--vocab-size", "1000000000", "--out", "m"], "vocab_size must be in [1, 1048576]"),
    (["generate", "hi", "--max-new-tokens", "1000000000000"], "max_new_tokens must be in [1, 1048576]"),
    (["lr-find", "--steps", "0"], "steps must be in [1, 10000], got 0"),
    (["tokenizer", "inspect", "models/default", "--top", "-1"], "top must be in [0, 1048576], got -1"),
    (["eval", "perplexity", "models/default", "README.md", "--context", "0"], "context must be in [4, 1048576]"),
    (["init", "--preset", "nano", "--weights-dtype", "float16", "--out", "m"],
     "weights_dtype must be one of auto, float32, bfloat16, got 'float16'"),
])
def test_out_of_range_values_are_refused_with_the_range(cli, args, says, monkeypatch, tmp_path):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    r = cli(*[a if a != "m" else str(tmp_path / "m") for a in args])
    assert r.code == 2 and says in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_info_prints_sections_as_text_unwrapped_in_a_pipe(cli, model_dir):
    r = cli("info", model_dir)
    assert r.code == 0 and "{'" not in r.out and "tokenizer" in r.out
    row = next(line for line in r.out.splitlines() if line.startswith("tokenizer"))
    assert "file tokenizer.model, sha256 " in row and "vocab_size 400" in row  # one line, however long
