"""`lbdl finetune`: LoRA, QLoRA and full fine-tuning on the training loop (train/finetune.py)."""

import json

import pytest
import torch
from conftest import ROOT, free_port
from safetensors.torch import load_file

from lbdl_cli.checkpoint import load_model
from lbdl_cli.errors import CheckpointError
from lbdl_cli.lora import LoRAConfig, LoRALinear, load_adapter, lora_modules
from lbdl_cli.train.config import FinetuneConfig
from lbdl_cli.train.distributed import Dist
from lbdl_cli.train.finetune import LORA_STATE, finetune, finetune_parts
from quant.linear import QuantLinear


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Prompt/completion records from the shipped facts set."""
    path = tmp_path_factory.mktemp("records") / "facts.jsonl"
    lines = (ROOT / "data" / "tasks" / "facts-train.jsonl").read_text().splitlines()[:120]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(model_dir, records, out, **changes):
    values = dict(init_from=str(model_dir), data=str(records), out=str(out), max_steps=6, batch_size=4,
                  context=64, eval_interval=3, eval_batches=2, log_interval=1, peak_tflops=1.0,
                  compute_dtype="float32", lora=LoRAConfig(rank=4, alpha=8))
    return FinetuneConfig(**{**values, **changes})


def test_lora_trains_only_the_adapters_and_writes_peft_directories(model_dir, records, tmp_path):
    result = finetune(config(model_dir, records, tmp_path / "run"))
    assert result["steps"] == 6 and result["best_val_loss"] < result["initial_loss"]
    last = (tmp_path / "run" / "last").resolve()
    assert {p.name for p in last.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", LORA_STATE}
    adapter = json.loads((last / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    base, _ = load_model(model_dir)
    adapted, _ = load_model(model_dir)
    load_adapter(adapted, last, base_dir=model_dir)
    x = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        assert not torch.equal(base(x), adapted(x))  # B moved away from zero
    state = load_file(str(last / LORA_STATE))
    assert set(state) == {f"{n}.lora_{w}" for n in lora_modules(adapted) for w in "AB"}


def test_a_resumed_lora_run_is_bit_identical(model_dir, records, tmp_path):
    """Stopped after 3 steps and resumed to 6 (a constant lr: the same schedule either way): the adapters and the
    optimizer restored in place give the very same run."""
    flat = dict(schedule="constant", warmup=0.0)
    finetune(config(model_dir, records, tmp_path / "straight", **flat))
    finetune(config(model_dir, records, tmp_path / "halves", max_steps=3, **flat))
    finetune(config(model_dir, records, tmp_path / "halves", **flat), resume=True)
    a = load_file(str(tmp_path / "straight" / "last" / LORA_STATE))
    b = load_file(str(tmp_path / "halves" / "last" / LORA_STATE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_keeps_the_base_quantized_and_trains_float32_adapters(model_dir, records, tmp_path):
    cfg = config(model_dir, records, tmp_path / "q", method="qlora", quant_type="q8_0")
    parts = finetune_parts(cfg, Dist())
    adapted = lora_modules(parts.model)
    assert adapted and all(isinstance(m.base_layer, QuantLinear) for m in adapted.values())
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in adapted for w in "AB"}
    assert all(p.dtype == torch.float32 for n, p in parts.model.named_parameters() if n in trainable)
    result = finetune(cfg)
    assert result["best_val_loss"] < result["initial_loss"]
    training = json.loads((tmp_path / "q" / "last" / "training.json").read_text())
    assert training["method"] == "qlora" and training["records"]["template"] == "<|{role}|>\n{content}\n"
    adapter = json.loads((tmp_path / "q" / "last" / "adapter_config.json").read_text())
    assert adapter["lbdl_base_quantization"] == "q8_0"


def test_qlora_checkpoints_activations_unless_told_otherwise(model_dir, records, tmp_path):
    def every(method, given):
        return config(model_dir, records, tmp_path, method=method, grad_checkpoint=given).checkpoint_every

    found = {(method, given): every(method, given) for method in ("lora", "qlora", "full") for given in (None, 0, 2)}
    assert found == {("lora", None): 0, ("qlora", None): 1, ("full", None): 0, **{(m, g): g for m in
                     ("lora", "qlora", "full") for g in (0, 2)}}


def test_qlora_starts_from_a_quantized_model_directory_as_it_is(cli, model_dir, records, tmp_path):
    assert cli("quantize", model_dir, "--type", "q8_0", "--out", tmp_path / "q8").code == 0
    parts = finetune_parts(config(tmp_path / "q8", records, tmp_path / "run", method="qlora"), Dist())
    bases = [m.base_layer for m in lora_modules(parts.model).values()]
    assert bases and all(isinstance(b, QuantLinear) and b.fmt.name.lower() == "q8_0" for b in bases)
    assert parts.checkpoints.base_quantization == "q8_0"
    with pytest.raises(CheckpointError, match="is quantized: fine-tune it with --method qlora"):
        finetune_parts(config(tmp_path / "q8", records, tmp_path / "run2"), Dist())


def test_full_fine_tuning_writes_model_directories(model_dir, records, tmp_path):
    result = finetune(config(model_dir, records, tmp_path / "full", method="full"))
    model, cfg = load_model(tmp_path / "full" / "best")
    assert result["best_val_loss"] < result["initial_loss"] and cfg["training"]["step"] == result["best_step"]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_cli_finetune_and_its_errors(cli, model_dir, records, tmp_path):
    common = ["--max-steps", "2", "--batch-size", "2", "--context", "64", "--eval-interval", "2", "--eval-batches",
              "1", "--peak-tflops", "1", "--compute-dtype", "float32"]
    r = cli("finetune", model_dir, records, "--out", tmp_path / "run", "--rank", "2", "--targets", "q_proj",
            "--targets", "v_proj", *common, "--json")
    assert r.code == 0 and r.json()["steps"] == 2
    adapter = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["target_modules"] == ["c_attn"]  # GPT-2 fuses q, k, v: one pair
    assert adapter["lbdl_fused"] == {"transformer.h.0.attn.c_attn": [["blocks.0.attn.q_proj", 2],
                                                                     ["blocks.0.attn.v_proj", 2]],
                                     "transformer.h.1.attn.c_attn": [["blocks.1.attn.q_proj", 2],
                                                                     ["blocks.1.attn.v_proj", 2]]}
    for args, says in [(["--rank", "0"], "lora config: rank must be in [1, 65536], got 0"),
                       (["--targets", "nope"], "LoRA target 'nope' matches no linear layer"),
                       (["--method", "qlora", "--quant-type", "q3"], "quant_type must be one of")]:
        r = cli("finetune", model_dir, records, "--out", tmp_path / "bad", *args, *common)
        assert r.code == 2 and says in r.err and not (tmp_path / "bad").exists(), r.err
    r = cli("finetune", model_dir, "--out", tmp_path / "bad")
    assert r.code == 2 and "give MODEL and DATA" in r.err


def test_an_adapter_runs_unmerged_as_its_merge_does(cli, model_dir, records, tmp_path):
    """generate/eval --adapter (applied at load, nothing written) and `lbdl lora merge` (W + s B A saved) give the
    same model."""
    finetune(config(model_dir, records, tmp_path / "run"))
    adapter = tmp_path / "run" / "best"
    r = cli("lora", "merge", model_dir, adapter, "--out", tmp_path / "merged", "--json")
    assert r.code == 0 and r.json()["merged"] > 0 and not r.json()["dequantized"]
    text = tmp_path / "t.txt"
    text.write_text((ROOT / "data" / "tinyshakespeare-val.txt").read_text()[:4000])
    common = ["--context", "64", "--compute-dtype", "float32", "--json"]
    unmerged = cli("eval", "perplexity", model_dir, text, "--adapter", adapter, *common).json()["perplexity"]
    merged = cli("eval", "perplexity", tmp_path / "merged", text, *common).json()["perplexity"]
    base = cli("eval", "perplexity", model_dir, text, *common).json()["perplexity"]
    assert unmerged == pytest.approx(merged, rel=1e-5) and unmerged != pytest.approx(base, rel=1e-5)
    gen = ["To be", "-n", "8", "-t", "0", "--compute-dtype", "float32", "--json"]
    a = cli("generate", model_dir, *gen, "--adapter", adapter).json()["results"][0]["text"]
    b = cli("generate", tmp_path / "merged", *gen).json()["results"][0]["text"]
    assert a == b
    # another base: the recorded hash differs; --force-base applies it anyway (the shapes fit)
    r = cli("generate", tmp_path / "merged", *gen, "--adapter", adapter)
    assert r.code == 2 and "was trained on another base" in r.err and "--force-base" in r.err
    assert cli("generate", tmp_path / "merged", *gen, "--adapter", adapter, "--force-base").code == 0
    # merged and quantized again
    r = cli("lora", "merge", model_dir, adapter, "--out", tmp_path / "q", "--quantize", "q8_0", "--json")
    assert r.code == 0 and r.json()["quantized"] == "Q8_0"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["type"] == "q8_0"
    r = cli("lora", "merge", model_dir, adapter, "--out", tmp_path / "x", "--quantize", "q3")
    assert r.code == 2 and "unknown quantization type" in r.err and not (tmp_path / "x").exists()


def test_accumulated_micro_batches_weigh_every_completion_token_alike(model_dir, records, tmp_path):
    """Records mask their prompts, so two micro-batches score different counts of tokens: 2 x 2 accumulated must
    give the run of one batch of 4 (the mean over all scored tokens, not the mean of the two means)."""
    flat = dict(schedule="constant", warmup=0.0, lora=LoRAConfig(rank=4, alpha=8, lora_dropout=0.0))
    finetune(config(model_dir, records, tmp_path / "one", batch_size=4, **flat))
    finetune(config(model_dir, records, tmp_path / "two", batch_size=2, grad_accum=2, **flat))

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 6 and a == pytest.approx(b, abs=1e-5)
    sa = load_file(str(tmp_path / "one" / "last" / LORA_STATE))
    sb = load_file(str(tmp_path / "two" / "last" / LORA_STATE))
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def test_two_processes_match_one_process(model_dir, records, tmp_path):
    """LoRA under torchrun (DDP over the adapters, the base frozen): 2 ranks x batch 2 give the run of 1 x 4."""
    import os
    import subprocess
    import sys

    common = ["--max-steps", "4", "--context", "64", "--eval-interval", "2", "--eval-batches", "2", "--rank", "4",
              "--peak-tflops", "1", "--compute-dtype", "float32", "--log-interval", "1", "--lora-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lbdl_cli", "finetune", str(model_dir), str(records), *common,
                             "--batch-size", "4", "--out", str(tmp_path / "single")], capture_output=True, text=True,
                            env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}",
                          "-m", "lbdl_cli", "finetune", str(model_dir), str(records), *common, "--batch-size", "2",
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]

    def metrics(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert [m["step"] for m in a] == [m["step"] for m in b] and len(a) >= 4
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == pytest.approx(y[key], abs=2e-4), (x, y)
    sa = load_file(str(tmp_path / "single" / "last" / LORA_STATE))
    sb = load_file(str(tmp_path / "ddp" / "last" / LORA_STATE))
    assert sa.keys() == sb.keys() and max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4
    assert max(sa[k].abs().max().item() for k in sa if k.endswith("lora_B")) > 0  # the adapters did train
