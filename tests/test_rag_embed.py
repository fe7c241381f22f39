"""Dense embeddings (lbdl_cli/rag/embed.py): pooling known answers, batch invariance, identity, cutting, adapters."""

from __future__ import annotations

import pytest
import torch

from lbdl_cli.errors import ConfigError
from lbdl_cli.progress import collect
from lbdl_cli.rag.embed import POOLINGS, load_embedder, pool, same_model

TEXTS = ["To be, or not to be", "A", "", "Now is the winter of our discontent made glorious summer by this sun of York",
         "the quality of mercy is not strained"]


@pytest.fixture(scope="module")
def embedders(model_dir):
    return {p: load_embedder(model_dir, pooling=p, device="cpu") for p in POOLINGS}


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A LoRA adapter of the tiny model with non-zero B (a trained adapter's shape, random values)."""
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    model, _ = load_model(model_dir)
    cfg = LoRAConfig(rank=2)
    apply_lora(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.5)
    out = tmp_path_factory.mktemp("adapter") / "a"
    save_adapter(model, cfg, out, base_dir=model_dir)
    return out


def test_pool_known_answer_on_a_hand_made_batch():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]],   # length 2: position 2 is padding
                           [[0.0, 2.0], [2.0, 0.0], [0.0, -5.0]]])  # length 3
    lengths = torch.tensor([2, 3])
    eos = pool(hidden, lengths, "eos")
    torch.testing.assert_close(eos, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    mean = pool(hidden, lengths, "mean")  # row 0: (2, 2) / 1 -> unit; row 1: (2/3, -1) normalised
    torch.testing.assert_close(mean[0], torch.tensor([2.0, 2.0]) / 8 ** 0.5)
    torch.testing.assert_close(mean[1], torch.tensor([2 / 3, -1.0]) / (4 / 9 + 1) ** 0.5)
    with pytest.raises(ConfigError, match="pooling 'max'"):
        pool(hidden, lengths, "max")


@pytest.mark.parametrize("pooling", POOLINGS)
def test_embedding_equals_a_direct_forward_of_the_model(embedders, model_dir, pooling):
    """Known answer: the final norm's output (caught by a hook on the plain forward, whose head reads it) at the
    appended <eos>, or its mean over the text's tokens and <eos>, normalised."""
    from lbdl_cli.checkpoint import load_model

    emb = embedders[pooling]
    model, _ = load_model(model_dir)
    model.eval()
    got = emb.embed(TEXTS)
    for text, row in zip(TEXTS, got):
        ids = torch.tensor([emb.tokenizer.encode(text) + [emb.tokenizer.eos_id]])
        seen = []
        handle = model.norm_f.register_forward_hook(lambda mod, inp, out: seen.append(out))
        with torch.no_grad():
            logits = model(ids)
        handle.remove()
        h = seen[0][0]  # (T, C)
        head = model.tok_emb.weight
        torch.testing.assert_close(logits[0], h @ head.T, atol=1e-5, rtol=1e-5)  # what the head reads
        v = h[-1] if pooling == "eos" else h.mean(0)
        torch.testing.assert_close(row, v / v.norm(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_a_text_alone_equals_it_in_a_padded_batch(embedders, pooling):
    emb = embedders[pooling]
    together = emb.embed(TEXTS, batch_size=len(TEXTS))  # one batch, padded to the longest
    for i, text in enumerate(TEXTS):
        alone = emb.embed([text])[0]
        assert (together[i] - alone).abs().max() < 1e-5
    torch.testing.assert_close(emb.embed(TEXTS, batch_size=2), together, atol=1e-5, rtol=0)  # order kept


def test_rows_are_unit_norm_float32_and_poolings_differ(embedders):
    eos, mean = embedders["eos"].embed(TEXTS), embedders["mean"].embed(TEXTS)
    for v in (eos, mean):
        assert v.dtype == torch.float32 and v.shape == (len(TEXTS), embedders["eos"].identity["dim"])
        torch.testing.assert_close(v.norm(dim=1), torch.ones(len(TEXTS)))
    # a one-token text ("" -> <eos> alone) pools the same either way; the longer ones differ
    assert torch.allclose(eos[2], mean[2], atol=1e-6)
    assert all((eos[i] - mean[i]).abs().max() > 1e-3 for i in (0, 3, 4))
    assert embedders["eos"].embed([]).shape == (0, embedders["eos"].identity["dim"])


def test_a_long_text_is_cut_to_max_tokens(embedders):
    emb = embedders["eos"]
    assert emb.max_tokens == 63  # block_size 64, one position for <eos>
    long = " ".join(["the king and the queen of the land"] * 20)
    assert len(emb.tokenizer.encode(long)) > emb.max_tokens + 10
    a, b, c = emb.embed([long, long + " but a different ending entirely", long[:40]])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # only the first 63 tokens are read
    assert (a - c).abs().max() > 1e-3


def test_progress_reports_texts_per_batch(embedders):
    events = []
    embedders["eos"].embed(TEXTS, batch_size=2, progress=collect(events))
    assert [(e.stage, e.done, e.total, e.unit) for e in events] == [
        ("embed", d, 5, "texts") for d in (0, 2, 4, 5)]


def test_identity_and_same_model(embedders, model_dir, adapter_dir):
    from lbdl_cli.lora import base_sha256, file_sha256

    ident = embedders["eos"].identity
    assert ident == {"model": str(model_dir), "sha256": base_sha256(model_dir), "adapter": None,
                     "adapter_sha256": None, "pooling": "eos", "dim": 32}
    again = load_embedder(model_dir, device="cpu").identity
    assert same_model(ident, again)
    assert not same_model(ident, embedders["mean"].identity)  # another pooling
    adapted = load_embedder(model_dir, adapter=adapter_dir, device="cpu").identity
    assert adapted["adapter"] == str(adapter_dir)
    assert adapted["adapter_sha256"] == file_sha256(adapter_dir / "adapter_model.safetensors")
    assert not same_model(ident, adapted)
    assert same_model({**ident, "model": "/elsewhere/copy"}, ident)  # the path is not the identity


def test_an_adapter_changes_the_embedding(embedders, model_dir, adapter_dir):
    """The adapter is applied (as generate applies it): embeddings differ from the base's and equal those of
    the base with the adapter merged into its weights."""
    from lbdl_cli.checkpoint import load_model
    from lbdl_cli.lora import load_adapter, merge_lora

    adapted = load_embedder(model_dir, adapter=adapter_dir, device="cpu")
    got = adapted.embed(TEXTS)
    assert (got - embedders["eos"].embed(TEXTS)).abs().max() > 1e-2
    model, _ = load_model(model_dir)
    load_adapter(model, adapter_dir, base_dir=model_dir)
    merge_lora(model)
    model.eval()
    ids = torch.tensor([adapted.tokenizer.encode(TEXTS[0]) + [adapted.tokenizer.eos_id]])
    with torch.no_grad():
        v = model.hidden_states(ids)[0, -1]
    torch.testing.assert_close(got[0], v / v.norm(), atol=1e-5, rtol=1e-5)


def test_bad_pooling_is_refused_by_name(model_dir):
    with pytest.raises(ConfigError, match="pooling 'cls'.*eos or mean"):
        load_embedder(model_dir, pooling="cls")
