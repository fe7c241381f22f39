"""`lbdl finetune --objective contrastive` (train/contrastive.py): InfoNCE with in-batch negatives on the loop."""

import json
import math
import random

import pytest
import torch
from conftest import ROOT, free_port
from safetensors.torch import load_file

from lbdl_cli.errors import DataError
from lbdl_cli.lora import LoRAConfig
from lbdl_cli.rag.embed import load_embedder, recorded_pooling
from lbdl_cli.records import read_pairs
from lbdl_cli.train.config import FinetuneConfig
from lbdl_cli.train.contrastive import ContrastiveObjective, encode_pairs, info_nce, pair_batch, recall_at_1
from lbdl_cli.train.distributed import Dist
from lbdl_cli.train.finetune import LORA_STATE, finetune, finetune_parts


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """160 pairs: a line of Shakespeare (the passage) and three of its words, shuffled (the query)."""
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:60_000]
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 6]
    rng = random.Random(0)
    rng.shuffle(lines)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": " ".join(rng.sample(line.split(), 3)), "passage": line}) + "\n"
                            for line in lines[:160]))
    return path


def config(model_dir, pairs, out, **changes):
    values = dict(init_from=str(model_dir), data=str(pairs), out=str(out), objective="contrastive", max_steps=4,
                  batch_size=8, eval_interval=2, eval_batches=2, log_interval=1, peak_tflops=1.0,
                  compute_dtype="float32", lr=1e-2, lora=LoRAConfig(rank=8, alpha=16))
    return FinetuneConfig(**{**values, **changes})


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_info_nce_on_a_hand_made_similarity_matrix():
    sim = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.5, 0.4], [0.0, 0.6, 0.2]])
    t = 0.5

    def ce(row, target):  # -log softmax(row / t)[target], by hand
        return -(row[target] / t - math.log(sum(math.exp(v / t) for v in row)))

    rows = sim.tolist()
    cols = sim.t().tolist()
    expected = (sum(ce(rows[i], i) for i in range(3)) / 3 + sum(ce(cols[i], i) for i in range(3)) / 3) / 2
    assert info_nce(sim, t).item() == pytest.approx(expected, rel=1e-6)
    labels = torch.arange(3)
    torch_ce = (torch.nn.functional.cross_entropy(sim / t, labels) + torch.nn.functional.cross_entropy(sim.t() / t,
                                                                                                        labels)) / 2
    assert info_nce(sim, t).item() == pytest.approx(torch_ce.item(), rel=1e-6)
    assert info_nce(sim, t, reduction="sum").item() == pytest.approx(3 * expected, rel=1e-6)
    assert recall_at_1(sim) == 2.0  # rows 0 and 1 rank their own passage first; row 2 prefers passage 1
    assert recall_at_1(torch.eye(3)) == 3.0


def test_training_lowers_the_held_out_loss_and_the_adapter_embeds_as_trained(model_dir, pairs, tmp_path):
    """A LoRA run: the validation loss falls and in-batch recall on training pairs rises; its best/ adapter loads
    into rag.embed.load_embedder, records its pooling, and embeds as the objective did in training."""
    run = tmp_path / "run"
    result = finetune(config(model_dir, pairs, run, max_steps=8, eval_interval=4))
    assert result["objective"] == "contrastive" and result["pooling"] == "eos"
    evals = [m for m in metrics(run) if "val_loss" in m]
    assert [m["step"] for m in evals] == [4, 8] and all(0 <= m["val_recall_at_1"] <= 1 for m in evals)
    best = run / "best"
    assert recorded_pooling(model_dir, best) == "eos" and recorded_pooling(model_dir) is None
    training = json.loads((best / "training.json").read_text())
    assert training["objective"] == "contrastive" and training["embedding"]["temperature"] == 0.05

    queries, passages = zip(*read_pairs(pairs)[:48])
    base = load_embedder(model_dir, device="cpu")
    tuned = load_embedder(model_dir, adapter=best, device="cpu")

    def scores(emb):  # the loss and recall@1 of the pairs in batches of 8, as in training
        q, p = emb.embed(list(queries)), emb.embed(list(passages))
        sims = [q[i:i + 8] @ p[i:i + 8].t() for i in range(0, len(q), 8)]
        return sum(info_nce(s, 0.05).item() for s in sims) / len(sims), sum(recall_at_1(s) for s in sims)

    (loss0, hits0), (loss1, hits1) = scores(base), scores(tuned)
    assert loss1 < loss0 - 0.3 and hits1 > hits0
    # the held-out loss as the loop scored it, with the base model and with the trained adapter
    parts = finetune_parts(config(model_dir, pairs, tmp_path / "unused"), Dist())
    objective = ContrastiveObjective("eos", 0.05)
    with torch.no_grad():
        scored = [objective.score(parts.model.eval(), x, y) for x, y in parts.val]
    assert result["best_val_loss"] < sum(s[0] for s in scored) / sum(s[1] for s in scored)
    # the loop's embedding of a batch of pairs is the embedder's of their texts
    x, y = pair_batch(encode_pairs(list(zip(queries, passages))[:5], tuned.tokenizer, 64), tuned.tokenizer.eos_id)
    with torch.no_grad():
        q, p = objective.embed(tuned.model, x, y)
    torch.testing.assert_close(q, tuned.embed(list(queries[:5])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, tuned.embed(list(passages[:5])), atol=1e-5, rtol=1e-5)


def test_accumulated_micro_batches_give_the_loss_of_the_global_batch(model_dir, pairs, tmp_path):
    """In-batch negatives span every micro-batch: 2 x 2 accumulated is the run of one batch of 4 (losses and
    adapters), not two batches of 2 with fewer negatives."""
    flat = dict(schedule="constant", warmup=0.0, max_steps=3, eval_interval=3, eval_batches=1)
    finetune(config(model_dir, pairs, tmp_path / "one", batch_size=4, **flat))
    finetune(config(model_dir, pairs, tmp_path / "two", batch_size=2, grad_accum=2, **flat))
    a = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
    b = [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m]
    assert len(a) == 3 and a == pytest.approx(b, abs=1e-5)
    sa = load_file(str(tmp_path / "one" / "last" / LORA_STATE))
    sb = load_file(str(tmp_path / "two" / "last" / LORA_STATE))
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5
    # a batch of 2 pairs is another loss (one negative each instead of three)
    c = finetune(config(model_dir, pairs, tmp_path / "small", batch_size=2, **flat))
    assert c["initial_loss"] != pytest.approx(a[0], abs=1e-3)


def test_full_contrastive_run_writes_a_model_directory_that_records_its_pooling(model_dir, pairs, tmp_path):
    run = tmp_path / "full"
    result = finetune(config(model_dir, pairs, run, method="full", pooling="mean", lr=1e-3, max_steps=2))
    cfg = json.loads((run / "best" / "config.json").read_text())
    assert cfg["embedding"] == {"objective": "contrastive", "pooling": "mean", "temperature": 0.05}
    assert recorded_pooling(run / "best") == "mean" and result["steps"] == 2
    emb = load_embedder(run / "best", pooling=recorded_pooling(run / "best"), device="cpu")
    assert not torch.allclose(emb.embed(["to be or not"]), load_embedder(model_dir, pooling="mean",
                                                                         device="cpu").embed(["to be or not"]))


def test_a_resumed_contrastive_run_is_bit_identical(model_dir, pairs, tmp_path):
    flat = dict(schedule="constant", warmup=0.0, eval_interval=2, eval_batches=1)
    finetune(config(model_dir, pairs, tmp_path / "straight", **flat))
    finetune(config(model_dir, pairs, tmp_path / "halves", **{**flat, "max_steps": 2}))
    finetune(config(model_dir, pairs, tmp_path / "halves", **flat), resume=True)
    a = load_file(str(tmp_path / "straight" / "last" / LORA_STATE))
    b = load_file(str(tmp_path / "halves" / "last" / LORA_STATE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("line, says", [
    ('{"query": "a"}', "lacks 'passage'"),
    ('{"passage": "b"}', "lacks 'query'"),
    ('{"query": 3, "passage": "b"}', "'query' must be a string, got a number"),
    ('{"query": "a", "passage": ""}', "'passage' is empty"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_a_bad_pair_is_refused_naming_its_line(tmp_path, line, says):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "q", "passage": "p"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"{path.name}:3: .*{says}"):
        read_pairs(path)


def test_cli_contrastive_flags_and_errors(cli, model_dir, pairs, tmp_path):
    common = ["--objective", "contrastive", "--max-steps", "2", "--batch-size", "4", "--eval-interval", "2",
              "--eval-batches", "1", "--peak-tflops", "1", "--compute-dtype", "float32"]
    r = cli("finetune", model_dir, pairs, "--out", tmp_path / "run", "--pooling", "mean",
            "--contrastive-temperature", "0.1", *common, "--json")
    assert r.code == 0 and r.json()["objective"] == "contrastive" and r.json()["pooling"] == "mean"
    assert json.loads((tmp_path / "run" / "best" / "training.json").read_text())["embedding"] == {
        "objective": "contrastive", "pooling": "mean", "temperature": 0.1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "passage": "p"}\n{"prompt": "x", "completion": "y"}\n')
    for args, says in [([bad], f"pairs file {bad}:2: the record lacks 'query' and 'passage'"),
                       ([pairs, "--pooling", "max"], "pooling"),
                       ([pairs, "--contrastive-temperature", "0"], "contrastive_temperature"),
                       ([pairs, "--objective", "mlm"], "objective")]:
        r = cli("finetune", model_dir, *args, "--out", tmp_path / "bad",
                *(common if "--objective" not in args else common[2:]))
        assert r.code == 2 and says in r.err and len(r.err.strip().splitlines()) == 1, r.err
        assert not (tmp_path / "bad").exists()


def test_two_processes_share_their_negatives(model_dir, pairs, tmp_path):
    """Under torchrun the embeddings are gathered across ranks: 2 ranks x 2 pairs are the run of 1 x 4."""
    import os
    import subprocess
    import sys

    common = ["--objective", "contrastive", "--max-steps", "2", "--eval-interval", "2", "--eval-batches", "2",
              "--rank", "4", "--lr", "0.01", "--peak-tflops", "1", "--compute-dtype", "float32", "--log-interval",
              "1", "--schedule", "constant", "--warmup", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lbdl_cli", "finetune", str(model_dir), str(pairs), *common,
                             "--batch-size", "4", "--out", str(tmp_path / "single")], capture_output=True, text=True,
                            env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "lbdl_cli", "finetune", str(model_dir), str(pairs),
                          *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")], capture_output=True,
                         text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a = [m["loss"] for m in metrics(tmp_path / "single") if "loss" in m]
    b = [m["loss"] for m in metrics(tmp_path / "ddp") if "loss" in m]
    assert len(a) == 2 and a == pytest.approx(b, abs=1e-5)
    sa = load_file(str(tmp_path / "single" / "last" / LORA_STATE))
    sb = load_file(str(tmp_path / "ddp" / "last" / LORA_STATE))
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5
