"""Training: schedules, batches, determinism, exact resume after SIGKILL / Ctrl-C,
divergence, refusals, early stopping, fine-tuning, DDP parity, lr-find, plot."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port

from lbdl_cli.checkpoint import load_model
from lbdl_cli.data import WindowSampler, unigram_loss
from lbdl_cli.errors import ConfigError, DataError, RunFailed
from lbdl_cli.model import GPT
from lbdl_cli.progress import collect
from lbdl_cli.train import TrainConfig, resolve
from lbdl_cli.train.loop import Trainer, param_groups, resume_config, train
from lbdl_cli.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(preset="nano", batch_size=4, context=32, eval_interval=5, eval_batches=2, log_interval=1,
             compute_dtype="float32", peak_tflops=1.0)


def make_shards(root: Path, name: str, vocab: int, text: str) -> Path:
    from lbdl_cli.data import prepare
    from tokenizer import train as train_tokenizer

    (root / f"{name}.txt").write_text(text)
    train_tokenizer([root / f"{name}.txt"], vocab_size=vocab, out=root / f"{name}-tok")
    prepare([root / f"{name}.txt"], root / f"{name}-tok", root / f"{name}-shards")
    return root / f"{name}-shards"


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    return make_shards(tmp_path_factory.mktemp("train-data"), "shake", 512, text)


def weights(path):
    return load_model(path)[0].state_dict()


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "lbdl_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def metrics_of(run: Path, timing: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl, without the timings (tokens/s, MFU) unless asked."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return records if timing else [{k: v for k, v in m.items() if k not in ("tokens_per_s", "mfu")} for m in records]


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- schedule, optimizer groups, batches ---------------------------------------------


def test_cosine_schedule_known_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, max_steps=110)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-3 / 20)
    assert lr_at(5, cfg, 110) == pytest.approx(1e-3 / 20 + (1e-3 - 1e-3 / 20) * 0.5)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_and_decay_as_fractions_and_other_schedules():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup=0.1, max_steps=100)
    assert lr_at(10, cfg, 100) == 1.0 and lr_at(9, cfg, 100) < 1.0
    half = TrainConfig(lr=1.0, min_lr=0.0, warmup=0, decay=0.5, max_steps=100)
    assert lr_at(25, half, 100) == pytest.approx(0.5) and lr_at(50, half, 100) == 0.0 == lr_at(99, half, 100)
    const = TrainConfig(lr=2.0, schedule="constant", warmup=0)
    assert {lr_at(s, const, 100) for s in range(100)} == {2.0}
    step = TrainConfig(lr=1.0, min_lr=0.0, schedule="step", warmup=0, step_every=30, step_gamma=0.5)
    assert [lr_at(s, step, 100) for s in (0, 29, 30, 59, 60, 90)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_weight_decay_on_matrices_only():
    model = GPT(TrainConfig and __import__("lbdl_cli.model", fromlist=["ModelConfig"]).ModelConfig(
        vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        n for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n)
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "norm_f.weight", "blocks.0.attn.q_proj.bias"} <= {
        names[id(p)] for p in no_decay["params"]}


def test_window_sampler_epochs_cover_every_window_once():
    tokens = np.arange(1001, dtype=np.uint16)
    s = WindowSampler(tokens, context=10, seed=3)
    assert s.n_windows == 100
    first, second = s.windows(0, 100), s.windows(100, 100)
    assert sorted(first) == sorted(second) == list(range(100)) and first != second
    x, y = s.batch(5, 4)
    assert x.shape == (4, 10) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(WindowSampler(tokens, 10, 3).batch(37, 6)[0], s.batch(37, 6)[0])
    assert not torch.equal(WindowSampler(tokens, 10, 4).batch(0, 6)[0], s.batch(0, 6)[0])
    # two ranks taking halves of a global batch see exactly the single-process batch
    whole = s.batch(40, 8)[0]
    assert torch.equal(torch.cat([s.batch(40, 4)[0], s.batch(44, 4)[0]]), whole)


def test_unigram_baseline_known_answer():
    train_tokens = np.array([0, 0, 0, 1], dtype=np.uint16)  # counts 3, 1 -> add-one: 4/6, 2/6
    val = np.array([0, 1], dtype=np.uint16)
    assert unigram_loss(train_tokens, val, 2) == pytest.approx(-(math.log(4 / 6) + math.log(2 / 6)) / 2)


# --- runs ------------------------------------------------------------------------------


def test_run_directory_and_learning(shards, tmp_path):
    events = []
    cfg = {**SMALL, "batch_size": 8, "context": 64, "eval_interval": 20}
    result = train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=80, lr=3e-3, **cfg),
                   collect(events))
    run = tmp_path / "run"
    start = events[0].data
    assert abs(start["initial_loss"] - math.log(512)) < 0.3
    assert result["best_val_loss"] < start["unigram_loss"] < start["initial_loss"]
    for name in ("best", "last"):
        model, config = load_model(run / name)
        assert config["model"]["vocab_size"] == 512
        assert (run / name / "tokenizer.model").read_bytes() == (shards / "tokenizer.model").read_bytes()
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 80
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 81))
    assert [m["step"] for m in metrics if "val_loss" in m] == [20, 40, 60, 80]
    assert all({"lr", "grad_norm", "tokens_per_s", "mfu"} <= m.keys() for m in metrics if "loss" in m)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step-0000080"]  # best and last
    # progress: stage "train", done = the step; the step records and the evaluations as metrics.jsonl has them
    assert {(e.stage, e.total, e.unit) for e in events} == {("train", 80, "steps")}
    assert events[0].done == 0 and "parameters" in events[0].message and start["total_steps"] == 80
    assert [e.data for e in events if "loss" in e.data] == [m for m in metrics if "loss" in m]
    assert [e.data for e in events if "val_loss" in e.data] == [m for m in metrics if "val_loss" in m]
    assert [e.done for e in events if not e.message] == list(range(1, 81))  # one event a step, and messages
    assert all(e.status.startswith("loss ") and " tok/s " in e.status and " MFU " in e.status for e in events[1:])
    evals = [e for e in events if "val_loss" in e.data]
    assert [e.message.split(":")[0] for e in evals] == ["step 20", "step 40", "step 60", "step 80"]
    assert not any(e.level == "warning" for e in events)


def test_warns_when_the_initial_loss_is_far_from_ln_vocab(shards, tmp_path, monkeypatch):
    import lbdl_cli.train.pretrain as pretrain

    real = pretrain.build_model

    def badly_initialised(*args):
        model, sections = real(*args)
        with torch.no_grad():
            model.norm_f.weight.mul_(100.0)  # logits 100x too large: a loss far above ln(V)
        return model, sections

    monkeypatch.setattr(pretrain, "build_model", badly_initialised)
    events = []
    train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=1, **SMALL), collect(events))
    warnings = [e.message for e in events if e.level == "warning"]
    assert len(warnings) == 1 and "more than 0.5 from ln(V) = 6.238" in warnings[0]


def test_same_seed_gives_bit_identical_weights(shards, tmp_path):
    cfg = dict(data=str(shards), max_steps=8, dropout=0.1, **SMALL)
    train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    assert_same_weights(tmp_path / "a" / "last", tmp_path / "b" / "last")
    train(TrainConfig(out=str(tmp_path / "c"), **{**cfg, "seed": 7}))
    assert not torch.equal(weights(tmp_path / "a" / "last")["tok_emb.weight"],
                           weights(tmp_path / "c" / "last")["tok_emb.weight"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_after_sigkill_is_bit_identical(shards, tmp_path, dtype):
    args = ["train", "--data", shards, "--preset", "nano", "--batch-size", 4, "--context", 32, "--max-steps", 40,
            "--eval-interval", 5, "--eval-batches", 2, "--dropout", 0.1, "--compute-dtype", dtype, "--peak-tflops", 1,
            "--grad-accum", 2]
    reference = run_cli(*args, "--out", tmp_path / "ref")
    assert reference.wait() == 0, reference.stderr.read()
    victim = run_cli(*args, "--out", tmp_path / "run")
    deadline = time.time() + 120
    while not (tmp_path / "run" / "ckpt" / "step-0000015").exists() and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = run_cli("train", "--resume", tmp_path / "run")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert_same_weights(tmp_path / "ref" / "last", tmp_path / "run" / "last")
    assert metrics_of(tmp_path / "ref") == metrics_of(tmp_path / "run")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0_bit_identically(shards, tmp_path, cli):
    args = ["train", "--data", shards, "--preset", "nano", "--batch-size", 4, "--context", 32, "--max-steps", 100,
            "--eval-interval", 1000, "--eval-batches", 2, "--dropout", 0.1, "--compute-dtype", "float32",
            "--peak-tflops", 1, "--log-interval", 1]
    reference = run_cli(*args, "--out", tmp_path / "ref")
    assert reference.wait() == 0, reference.stderr.read()
    run = tmp_path / "run"
    victim = run_cli(*args, "--out", run)
    deadline = time.time() + 120
    while time.time() < deadline and (not (run / "metrics.jsonl").exists()
                                      or (run / "metrics.jsonl").read_text().count("\n") < 5):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not os.path.lexists(run / "last") and len(metrics_of(run)) >= 5  # killed mid-run, no checkpoint yet
    r = cli("train", *args[1:], "--out", run)  # the advice given is the command that works
    assert r.code == 2 and f"pass --resume {run} to continue it" in r.err
    resumed = run_cli("train", "--resume", run, "--json")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert_same_weights(tmp_path / "ref" / "last", run / "last")
    assert metrics_of(tmp_path / "ref") == metrics_of(run)
    assert json.loads(resumed.stdout.read().splitlines()[-1])["resume_loss"] is None  # it started over


def test_stale_temporaries_go_and_a_half_replaced_checkpoint_comes_back(shards, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(shards), out=str(run), max_steps=5, **SMALL)
    train(cfg)
    dead, live = dead_pid(), os.getppid()  # the test's own pid would be the writer's: its temporaries are its own
    stale = [run / f".last.tmp-{dead}", run / f".metrics.jsonl.tmp-{dead}", run / "ckpt" / f".step-0000010.tmp-{dead}",
             run / "ckpt" / f".step-0000003.tmp-{dead}", tmp_path / f".run.old-{dead}"]
    kept = [run / f".last.tmp-{live}", run / "ckpt" / f".step-0000010.tmp-{live}"]
    for path in stale + kept:
        path.mkdir()
    (run / f".best.tmp-{dead}").symlink_to("ckpt/step-0000005")  # a link made but not yet put in place
    # a kill between atomic_dir's two renames, while step 5 was written again: `last` points at nothing
    (run / "ckpt" / "step-0000005").rename(run / "ckpt" / f".step-0000005.old-{dead}")
    result = train(cfg.replace(max_steps=10), resume=True)
    assert result["steps"] == 10
    assert not any(os.path.lexists(p) for p in stale + [run / f".best.tmp-{dead}"])
    assert all(p.is_dir() for p in kept)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [f".step-0000010.tmp-{live}", "step-0000010"]
    assert [m["step"] for m in metrics_of(run) if "loss" in m] == list(range(1, 11))


def test_a_resumed_run_reports_its_own_initial_loss(shards, tmp_path):
    events = []
    cfg = TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=5, lr=3e-3, **SMALL)
    first = train(cfg, collect(events))
    assert first["initial_loss"] == events[0].data["initial_loss"] and first["resume_loss"] is None
    trainer_state = json.loads(((tmp_path / "run" / "last").resolve() / "trainer_state.json").read_text())
    assert trainer_state["initial_loss"] == first["initial_loss"]
    events = []
    resumed = train(cfg.replace(max_steps=8), collect(events), resume=True)
    assert resumed["initial_loss"] == first["initial_loss"] == events[0].data["initial_loss"]
    assert resumed["resume_loss"] == events[0].data["resume_loss"] < first["initial_loss"] - 0.1  # it had learnt
    assert "resumed at step 5: loss" in events[0].message


def test_ctrl_c_checkpoints_exits_130_and_resumes(shards, tmp_path):
    args = ["train", "--data", shards, "--preset", "nano", "--batch-size", 4, "--context", 32, "--max-steps", 400,
            "--eval-interval", 1000, "--eval-batches", 2, "--compute-dtype", "float32", "--peak-tflops", 1]
    proc = run_cli(*args, "--out", tmp_path / "run")
    deadline = time.time() + 60
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    err = proc.stderr.read().strip().splitlines()
    assert len(err) == 1 and "interrupted at step" in err[0] and "--resume" in err[0]
    step = json.loads(((tmp_path / "run" / "last").resolve() / "trainer_state.json").read_text())["step"]
    assert 0 < step < 400
    resumed = run_cli("train", "--resume", tmp_path / "run", "--max-steps", step + 3, "--json")
    assert resumed.wait() == 0
    assert json.loads(resumed.stdout.read().splitlines()[-1])["steps"] == step + 3


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    real = Trainer._loss

    def poisoned(self, x, y, **kwargs):
        loss = real(self, x, y, **kwargs)
        return loss * math.nan if self.step >= 7 else loss

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(RunFailed,
                       match=r"loss became nan at step 8; stopped\. Last good checkpoint: .*last \(step 5\)"):
        train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=20, **SMALL))
    model, config = load_model(tmp_path / "run" / "last")
    assert config["training"]["step"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_early_stopping_keeps_the_best(shards, tmp_path, monkeypatch):
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 1.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(scores))
    result = train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=100, patience=3,
                               **{**SMALL, "eval_interval": 2}))
    assert result["stop_reason"] == "early_stopping" and result["steps"] == 10
    assert result["best_step"] == 4 and result["best_val_loss"] == 2.0
    assert load_model(tmp_path / "run" / "best")[1]["training"]["step"] == 4
    assert load_model(tmp_path / "run" / "last")[1]["training"]["step"] == 10


def test_overfit_one_batch(shards, tmp_path):
    result = train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=150, overfit_batch=True,
                               lr=3e-3, warmup=10, schedule="constant",
                               **{**SMALL, "batch_size": 2, "eval_interval": 1000}))
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert result["steps"] == 150 and last["loss"] < 0.2 and result["overfit_passed"]


def test_train_command(shards, tmp_path, cli):
    r = cli("train", "--help")
    for flag in ("--max-steps", "--grad-accum", "--weight-decay", "--compile", "--resume", "--overfit-batch"):
        assert flag in r.out
    args = ["--data", shards, "--preset", "nano", "--batch-size", 2, "--context", 32, "--compute-dtype", "float32",
            "--peak-tflops", 1, "--lr", 3e-3, "--schedule", "constant"]
    r = cli("train", *args, "--overfit-batch", "--max-steps", 120, "--out", tmp_path / "o")
    assert r.code == 0 and "overfit check:" in r.out and "passed" in r.out
    r = cli("train", *args, "--max-steps", 3, "--out", tmp_path / "o", "--json")
    assert r.code == 2 and "already holds another run" in r.err
    r = cli("train", *args, "--max-steps", 3, "--out", tmp_path / "o", "--force", "--json")
    assert r.code == 0 and r.json()["steps"] == 3 and "overfit_passed" not in r.json()
    r = cli("train", *args, "--max-steps", 3, "--out", tmp_path / "p", "--context", 999)
    assert r.code == 2 and r.err.count("\n") == 1 and "block_size" in r.err
    assert not (tmp_path / "p").exists()


# --- refusals: one clear error before anything is written -------------------------------


def test_refuses_context_longer_than_block_size(shards, tmp_path):
    with pytest.raises(ConfigError, match="--context 300 is longer than the model's block_size 256"):
        train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), **{**SMALL, "context": 300}))
    assert not (tmp_path / "run").exists()


def test_refuses_a_directory_holding_another_run(shards, tmp_path):
    cfg = TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=2, **SMALL)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds another run; pass --resume .* or --force"):
        train(cfg)
    assert train(cfg, force=True)["steps"] == 2


def test_refuses_batches_that_do_not_fit(shards, tmp_path):
    with pytest.raises(ConfigError,
                       match=r"a step of 1000 x 1 x 1 sequences .* is more than the .* windows of the training shard"):
        train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), **{**SMALL, "batch_size": 1000, "context": 256}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="the validation shard has 100 tokens, fewer than one window of context 128"):
        WindowSampler(np.zeros(100, dtype=np.uint16), 128, 0, name="validation")


def test_fine_tune_refuses_another_tokenizer(shards, tmp_path):
    train(TrainConfig(data=str(shards), out=str(tmp_path / "base"), max_steps=2, **SMALL))
    other = make_shards(tmp_path, "other", 400, (ROOT / "data" / "tinyshakespeare.txt").read_text()[200_000:260_000])
    with pytest.raises(DataError, match="different tokenizer"):
        train(TrainConfig(data=str(other), out=str(tmp_path / "ft"), init_from=str(tmp_path / "base" / "last"),
                          **{k: v for k, v in SMALL.items() if k != "preset"}))
    assert not (tmp_path / "ft").exists()


def test_fine_tune_starts_from_the_model_with_a_smaller_lr(shards, tmp_path):
    train(TrainConfig(data=str(shards), out=str(tmp_path / "base"), max_steps=10, lr=3e-3, **SMALL))
    events = []
    cfg = TrainConfig(data=str(shards), out=str(tmp_path / "ft"), init_from=str(tmp_path / "base" / "last"),
                      max_steps=3, warmup=0, schedule="constant", **{k: v for k, v in SMALL.items() if k != "preset"})
    assert cfg.base_lr == 1e-4
    train(cfg, collect(events))
    start = events[0].data
    assert start["initial_loss"] < math.log(512) - 1.0  # it starts from the trained weights
    assert [e.data["lr"] for e in events if "lr" in e.data] == [1e-4] * 3


def test_toml_config_and_flag_override(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[train]\npreset = "nano"\nmax-steps = 30\nlr = 0.002\nbatch_size = 8\n')
    cfg = resolve(str(path), {"max_steps": 5})
    assert (cfg.preset, cfg.max_steps, cfg.lr, cfg.batch_size) == ("nano", 5, 0.002, 8)
    path.write_text("lr = 'fast'\n")
    with pytest.raises(ConfigError, match="lr must be a float"):
        resolve(str(path), {})
    path.write_text("learning_rate = 1\n")
    with pytest.raises(ConfigError, match=f"config file {path}: unknown key 'learning_rate'"):
        resolve(str(path), {})


def test_train_config_validation():
    with pytest.raises(ConfigError, match="schedule must be one of cosine, constant, step"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(preset="nano", init_from="x")
    with pytest.raises(ConfigError, match=r"batch_size must be in \[1, \d+\], got 0"):
        TrainConfig(batch_size=0)
    for bad in ({"beta1": 1.0}, {"dropout": 1.0}, {"lr": 0.0}, {"min_lr": -1.0}, {"context": 0}, {"max_steps": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_train_config_defaults_are_none_and_round_trip(tmp_path):
    default = TrainConfig()
    assert (default.lr, default.min_lr, default.dropout, default.context, default.max_steps) == (None,) * 5
    assert (default.base_lr, default.floor_lr) == (1e-3, 1e-4)
    assert (TrainConfig(init_from="m").base_lr, TrainConfig(lr=0.02, min_lr=0.0).floor_lr) == (1e-4, 0.0)
    cfg = TrainConfig(data="d", out="o", preset="nano", max_steps=30, lr=2e-3, dropout=0.0, peak_tflops=1.0,
                      schedule="step", compile=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_toml(cfg.to_toml()) == cfg
    assert TrainConfig.from_toml(cfg.to_toml(table="train"), table="train") == cfg
    (tmp_path / "t.toml").write_text(cfg.to_toml(table="train"))
    assert resolve(str(tmp_path / "t.toml"), {}) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default  # train_config.json
    with pytest.raises(ConfigError, match="unknown key 'max_step'"):
        TrainConfig.from_dict({"max_step": 3})


@pytest.mark.parametrize("job", ["train", "lr_find"])
def test_an_error_after_the_distributed_setup_tears_it_down(shards, tmp_path, monkeypatch, job):
    from lbdl_cli.train import distributed
    from lbdl_cli.train.lr_find import lr_find

    calls = []
    setup, teardown = distributed.setup, distributed.teardown
    monkeypatch.setattr(distributed, "setup", lambda device: calls.append(("setup", device)) or setup(device))
    monkeypatch.setattr(distributed, "teardown", lambda d: calls.append(("teardown", d.device)) or teardown(d))
    cfg = TrainConfig(data=str(shards), out=str(tmp_path / "run"), **{**SMALL, "context": 300, "device": "cpu"})
    with pytest.raises(ConfigError, match="longer than the model's block_size"):
        train(cfg) if job == "train" else lr_find(cfg, steps=1)
    assert calls == [("setup", "cpu"), ("teardown", "cpu")]


def test_resume_of_a_non_run_is_refused(tmp_path, cli):
    with pytest.raises(ConfigError, match="not a run directory"):
        resume_config(tmp_path, {})
    (tmp_path / "notes.txt").write_text("mine")
    r = cli("train", "--resume", tmp_path)
    assert r.code == 2 and r.err.count("\n") == 1 and f"{tmp_path} is not a run directory" in r.err


def test_out_is_checked_before_any_work(shards, tmp_path, cli):
    args = ["train", "--data", shards, "--preset", "nano", "--max-steps", 1, "--force"]
    (tmp_path / "file").write_text("x")
    model = tmp_path / "model"
    model.mkdir()
    data = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    for out, why in [(shards, "is the input"), (shards / "sub", "is inside the input"),
                     (shards.parent, "contains the input"), ("/proc/lbdl-run", "cannot write directory /proc/lbdl-run"),
                     (tmp_path / "file" / "run", "is a file, not a directory"),
                     (tmp_path / "file", "is a file, not a directory")]:
        r = cli(*args, "--out", out)
        assert r.code == 2 and r.err.count("\n") == 1 and str(out) in r.err and why in r.err, (out, r.err)
    r = cli("train", "--data", shards, "--init-from", model, "--out", model / "ft", "--force")
    assert r.code == 2 and f"output {model / 'ft'} is inside the input {model}" in r.err
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == data
    assert (tmp_path / "file").read_text() == "x"
    # a directory of other files is not a run: only --force or another path, never --resume
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    r = cli(*args[:-1], "--out", tmp_path / "mine")
    assert r.code == 2 and "pass --force to replace them or choose another --out" in r.err and "--resume" not in r.err


def test_broken_run_files_exit_2_naming_the_file_and_line(shards, tmp_path, cli):
    run = tmp_path / "run"
    train(TrainConfig(data=str(shards), out=str(run), max_steps=5, **SMALL))
    metrics = (run / "metrics.jsonl").read_text()
    # a last line cut short by a kill (no newline) is left out, by `lbdl plot` and by a resume
    (run / "metrics.jsonl").write_text(metrics + '{"step": 6, "lo')
    r = cli("plot", run, "--json")
    assert r.code == 0 and [s for s, _ in r.json()["train"]] == [1, 2, 3, 4, 5]
    plot, resume = ["plot", run], ["train", "--resume", run]
    for text, line, why, commands in [
            (metrics + "garbage\n", metrics.count("\n") + 1, "not valid JSON", (plot, resume)),
            ('{"loss": 2.0}\n', 1, 'expected an integer "step"', (plot, resume)),
            ('{"step": 1, "loss": "high"}\n', 1, "expected a number for 'loss'", (plot,))]:  # resume reads steps only
        (run / "metrics.jsonl").write_text(text)
        for args in commands:
            r = cli(*args)
            assert r.code == 2 and r.err.count("\n") == 1 and f"{run / 'metrics.jsonl'}:{line}: {why}" in r.err, \
                (args, r.err)
    (run / "metrics.jsonl").write_text(metrics)
    state = (run / "last").resolve() / "trainer_state.json"
    good = state.read_text()
    state.write_text(good[:40])
    r = cli("train", "--resume", run)
    assert r.code == 2 and r.err.count("\n") == 1 and f"trainer state {state} is not valid JSON (line " in r.err
    state.write_text('{"step": 5}')
    r = cli("train", "--resume", run)
    assert r.code == 2 and f"trainer state {state} lacks best_val" in r.err
    state.write_text(good)
    (run / "train_config.json").write_text('{"max_steps": 6,\n  oops}')
    r = cli("train", "--resume", run)
    assert r.code == 2 and r.err.count("\n") == 1 and f"{run / 'train_config.json'} is not valid JSON (line 2" in r.err


# --- scale out ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(shards, tmp_path, mode):
    common = ["--data", shards, "--preset", "nano", "--context", 32, "--max-steps", 6, "--eval-interval", 3,
              "--eval-batches", 2, "--compute-dtype", "float32", "--peak-tflops", 1, "--log-interval", 1]
    single = run_cli("train", *common, "--batch-size", 8, "--out", tmp_path / "single")
    assert single.wait() == 0, single.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}",
                          "-m", "lbdl_cli", "train", *map(str, common), "--batch-size", "4",
                          *(["--fsdp"] if mode == "fsdp" else []),
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]

    def read(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = read(tmp_path / "single"), read(tmp_path / "ddp")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == pytest.approx(y[key], abs=2e-4), (x, y)
    wa, wb = weights(tmp_path / "single" / "last"), weights(tmp_path / "ddp" / "last")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


# --- lr-find and plot --------------------------------------------------------------------


def test_lr_find_suggests_the_largest_stable_lr(shards):
    from lbdl_cli.train.lr_find import lr_find

    cfg = TrainConfig(data=str(shards), **{**SMALL, "eval_batches": 1})
    events = []
    result = lr_find(cfg, steps=6, lrs=[1e-4, 3e-3, 10.0], progress=collect(events))
    rows = {r["lr"]: r for r in result["rows"]}
    assert [(e.stage, e.done, e.total, e.unit, e.data) for e in events] == [
        ("lr-find", i + 1, 3, "lrs", row) for i, row in enumerate(result["rows"])]
    assert rows[10.0]["diverged"] and not rows[3e-3]["diverged"]
    assert rows[3e-3]["loss"] < rows[1e-4]["loss"] < result["initial_loss"]
    assert result["suggested_lr"] == 3e-3
    assert "lr:" in result["chart"]


def test_lr_find_refuses_no_steps_and_writes_its_png_atomically(tmp_path):
    from lbdl_cli.train.lr_find import lr_find, plot_lr_find

    for steps in (0, -1):
        with pytest.raises(ConfigError, match=f"steps must be a whole number >= 1, got {steps}"):
            lr_find(TrainConfig(), steps=steps)
    pytest.importorskip("matplotlib")
    result = {"rows": [{"lr": 1e-3, "loss": 5.0}, {"lr": 1e-2, "loss": 4.0}], "initial_loss": 6.0,
              "suggested_lr": 1e-2, "steps": 3}
    (tmp_path / "lr.png").write_text("old")
    plot_lr_find(result, str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lr.png"]


def test_plot_terminal_chart(shards, tmp_path, cli):
    train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), max_steps=10, **SMALL))
    r = cli("plot", tmp_path / "run")
    assert r.code == 0 and "train loss" in r.out and "val loss" in r.out
    r = cli("plot", tmp_path / "run", "--json")
    curves = r.json()
    assert len(curves["train"]) == 10 and [s for s, _ in curves["val"]] == [5, 10]
    r = cli("plot", tmp_path)
    assert r.code == 2 and "no metrics.jsonl" in r.err


def test_gradient_checkpointing_trains_the_same_run(shards, tmp_path):
    """--grad-checkpoint recomputes activations: the same run, step for step."""
    runs = []
    for every, name in ((0, "plain"), (1, "ckpt")):
        cfg = TrainConfig(data=str(shards), out=str(tmp_path / name), max_steps=3, grad_checkpoint=every,
                          **{**SMALL, "eval_interval": 3})
        runs.append(train(cfg))
    assert runs[0]["best_val_loss"] == pytest.approx(runs[1]["best_val_loss"], abs=1e-6)
