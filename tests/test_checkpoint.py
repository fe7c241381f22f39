import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, tiny_model
from safetensors.torch import save_file

import lbdl_cli.checkpoint as ckpt
import lbdl_cli.checkpoint.configs as configs
import lbdl_cli.checkpoint.directory as directory
from lbdl_cli.checkpoint import (
    InitConfig,
    atomic_dir,
    create_model,
    default_model_dir,
    load_model,
    load_preset,
    model_info,
    preset_names,
    save_model,
)
from lbdl_cli.errors import CheckpointError, ConfigError


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(family="llama")
    out = save_model(model, tmp_path / "m")
    return model, out


def test_round_trip_is_exact(saved):
    model, out = saved
    loaded, config = load_model(out)
    assert config["format_version"] == ckpt.FORMAT_VERSION
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_keeps_stored_dtype_or_converts(tmp_path):
    out = save_model(tiny_model().to(torch.bfloat16), tmp_path / "bf16")
    loaded, _ = load_model(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    loaded32, _ = load_model(out, dtype="float32")
    assert {p.dtype for p in loaded32.parameters()} == {torch.float32}
    assert model_info(out)["dtypes"] == ["BF16"]


def test_load_builds_nothing_on_meta(saved):
    loaded, _ = load_model(saved[1])
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_existing_output_is_refused_unless_forced(saved, tmp_path):
    model, out = saved
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        save_model(model, out)
    other = tiny_model(seed=1, family="llama")
    save_model(other, out, force=True)
    loaded, _ = load_model(out)
    assert torch.equal(loaded.tok_emb.weight, other.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old siblings left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(directory, "save_file", boom)
    with pytest.raises(OSError):
        save_model(tiny_model(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_directory(saved, tmp_path, monkeypatch):
    model, out = saved
    monkeypatch.setattr(directory, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(model, out, force=True)
    assert load_model(out)[0].config == model.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        with atomic_dir(tmp_path / "f", force=True):
            pass


# --- bad input: each a one-line CheckpointError naming the problem ----------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(saved):
    (saved[1] / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(saved[1])


def test_invalid_config_json(saved):
    (saved[1] / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved[1])


def test_missing_weights(saved):
    (saved[1] / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(saved[1])


def test_pickle_is_refused(saved):
    (saved[1] / "model.safetensors").rename(saved[1] / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickle"):
        load_model(saved[1])


def test_truncated_weights(saved):
    path = saved[1] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(saved[1])


def test_garbage_weights(saved):
    (saved[1] / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(saved[1])


def test_shape_mismatch_names_tensor_and_shapes(saved):
    path = saved[1] / "config.json"
    config = json.loads(path.read_text())
    config["model"]["vocab_size"] = 100
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError,
                       match=r"tensor tok_emb.weight has shape \[97, 32\] but the config expects \[100, 32\]"):
        load_model(saved[1])


def test_missing_tensor(saved):
    model, out = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "norm_f.weight"}
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*norm_f.weight"):
        load_model(out)


def test_unexpected_tensor(saved):
    model, out = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor.*extra.weight"):
        load_model(out)


def test_unknown_format_version(saved):
    path = saved[1] / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_model(saved[1])


def test_invalid_model_config_names_the_file(saved):
    path = saved[1] / "config.json"
    config = json.loads(path.read_text())
    config["model"]["mlp"] = "relu"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: model config: mlp"):
        load_model(saved[1])


def test_hf_directory_gets_a_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="lbdl import"):
        load_model(tmp_path)


# --- presets and metadata -------------------------------------------------------------


def test_presets_by_exact_name():
    assert {"nano", "micro", "small", "gpt2-124m", "llama-tiny"} <= set(preset_names())
    cfg, _ = load_preset("llama-tiny")
    assert (cfg.n_head, cfg.n_kv_head, cfg.mlp, cfg.positions) == (8, 2, "swiglu", "rope")
    with pytest.raises(ConfigError, match="unknown preset 'Nano'; valid presets: gpt2-124m, llama-tiny"):
        load_preset("Nano")


def test_create_model_and_info(tmp_path):
    result = create_model(tmp_path / "m", InitConfig(preset="nano", vocab_size=512, seed=3))
    assert abs(result["initial_loss"] - result["ln_vocab"]) < 0.1
    info = model_info(tmp_path / "m")
    assert info["params"] == result["params"] == load_model(tmp_path / "m")[0].num_params()
    assert info["model"]["vocab_size"] == 512 and info["dtypes"] == ["F32"]
    assert info["size_bytes"] > 4 * info["params"]
    assert info["source"] == {"preset": "nano", "seed": 3}
    again = create_model(tmp_path / "m2", InitConfig(preset="nano", vocab_size=512, seed=3))
    a, b = load_model(tmp_path / "m")[0], load_model(tmp_path / "m2")[0]
    assert again["initial_loss"] == result["initial_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_default_model_dir_is_clear_when_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(configs, "_presets_root", lambda: tmp_path)
    with pytest.raises(CheckpointError, match="bundled default model is missing"):
        default_model_dir()


def test_convert_dtype_keeps_tokenizer_and_sections(tmp_path, cli, tok_dir):
    model = tiny_model(vocab_size=400)
    save_model(model, tmp_path / "m", sections={"source": {"preset": "x"}}, tokenizer=tok_dir / "tokenizer.model")
    r = cli("convert", tmp_path / "m", "--weights-dtype", "bfloat16", "--out", tmp_path / "bf16", "--json")
    assert r.code == 0 and r.json()["dtype"] == "bfloat16"
    loaded, config = load_model(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert config["source"] == {"preset": "x"} and config["tokenizer"] == json.loads(
        (tmp_path / "m" / "config.json").read_text())["tokenizer"]
    assert (tmp_path / "bf16" / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.to(torch.bfloat16))
    assert model_info(tmp_path / "bf16")["size_bytes"] < 0.6 * model_info(tmp_path / "m")["size_bytes"]
    r = cli("convert", tmp_path / "m", "--weights-dtype", "float16", "--out", tmp_path / "f16")
    assert r.code == 2 and "dtype must be one of float32, bfloat16" in r.err and not (tmp_path / "f16").exists()


def test_a_model_directory_keeps_its_own_tokenizer(tok_dir, tmp_path, cli):
    """The tokenizer beside a model must be the model's: its vocabulary size, and the sha256 recorded at save."""
    from lbdl_cli.checkpoint import model_tokenizer
    from tokenizer import train as train_tokenizer

    with pytest.raises(CheckpointError, match="has 400 tokens but the model's vocabulary has 97"):
        save_model(tiny_model(), tmp_path / "wrong", tokenizer=tok_dir / "tokenizer.model")
    assert not (tmp_path / "wrong").exists()
    save_model(tiny_model(vocab_size=400), tmp_path / "m", tokenizer=tok_dir / "tokenizer.model")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tokenizer"]["vocab_size"] == 400 and len(config["tokenizer"]["sha256"]) == 64
    assert model_tokenizer(tmp_path / "m").vocab_size == 400
    # another tokenizer of the same size dropped in: caught by the recorded sha256
    (tmp_path / "t.txt").write_text((ROOT / "data" / "tinyshakespeare-val.txt").read_text()[:60_000])
    other = train_tokenizer([tmp_path / "t.txt"], vocab_size=400, out=tmp_path / "other")
    assert other.sha256 != model_tokenizer(tmp_path / "m").sha256
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", tmp_path / "m" / "tokenizer.model")
    with pytest.raises(CheckpointError, match="is not the tokenizer .* was saved with"):
        model_tokenizer(tmp_path / "m")
    # a smaller tokenizer in a directory without a recorded hash: caught by the vocabulary size
    del config["tokenizer"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    small = train_tokenizer([tmp_path / "t.txt"], vocab_size=340, out=tmp_path / "small")
    shutil.copyfile(tmp_path / "small" / "tokenizer.model", tmp_path / "m" / "tokenizer.model")
    r = cli("generate", tmp_path / "m", "To be", "-n", "2")
    assert r.code == 2 and r.err.strip().endswith("put the one it was trained with beside it")
    assert "has 340 tokens but the model's vocabulary has 400" in r.err and small.vocab_size == 340


def test_weights_get_the_permissions_of_every_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        save_model(tiny_model(), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}  # safetensors alone writes 0600


def test_safetensors_writer_streams_what_safetensors_reads(tmp_path):
    """SafetensorsWriter (one tensor at a time) gives the file safetensors' reader reads back exactly, bfloat16
    included, and TensorReader reads both its files and safetensors' own; out of order, a wrong shape and a
    missing tensor are refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lbdl_cli.checkpoint.stream import SafetensorsWriter, TensorReader
    from lbdl_cli.errors import CheckpointError

    tensors = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7).to(torch.bfloat16),
               "codes": torch.randint(0, 255, (2, 9), dtype=torch.uint8), "empty": torch.zeros(0, 4)}
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, {"x": "1"}) as w:
        for name, t in tensors.items():
            w.write(name, t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1"} and set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    reader = TensorReader(path)  # and back, one tensor at a time, a file safetensors wrote too
    assert all(torch.equal(reader.get(name), t) for name, t in tensors.items())
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    theirs = TensorReader(tmp_path / "theirs.safetensors")
    assert theirs.entries == {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    assert all(torch.equal(theirs.get(name), t) for name, t in tensors.items())
    spec = {"a": (torch.float32, (2,)), "b": (torch.float32, (1,))}
    with pytest.raises(CheckpointError, match="tensor b written out of order: a comes next"):
        with SafetensorsWriter(tmp_path / "x", spec) as w:
            w.write("b", torch.zeros(1))
    with pytest.raises(CheckpointError, match=r"tensor a is torch.float32 \[3\] but the header says torch.float32"):
        SafetensorsWriter(tmp_path / "y", spec).write("a", torch.zeros(3))
    with pytest.raises(CheckpointError, match="1 of 2 tensors were never written"):
        with SafetensorsWriter(tmp_path / "z", spec) as w:
            w.write("a", torch.zeros(2))
