"""Fine-tuning records: masks by format, chat rendering, packing, the sampler, the split, errors by file:line."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import SEP, assert_round_trips, tiny_model

from lbdl_cli.errors import ConfigError, DataError
from lbdl_cli.records import (
    IGNORE,
    RecordSampler,
    RecordsConfig,
    chat_prompt,
    encode_records,
    load_records,
    pack_examples,
    read_records,
    split_records,
    val_batches,
)

PAD = 999  # a pad id no example holds, so that padding is easy to find


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def completions(n, seed=0):
    rng = random.Random(seed)
    words = ["to", "be", "or", "not", "the", "king", "my", "lord", "sweet", "love"]
    return [{"prompt": " ".join(rng.choices(words, k=rng.randint(1, 6))) + ":",
             "completion": " " + " ".join(rng.choices(words, k=rng.randint(1, 8)))} for _ in range(n)]


# --- masks by format -----------------------------------------------------------------------


def test_completion_labels_are_exactly_the_completion_and_eos(tok):
    [(ids, labels)] = encode_records([{"prompt": "Who is there?", "completion": " Nay, answer me."}], tok)
    p, c = tok.encode("Who is there?"), tok.encode(" Nay, answer me.")
    assert ids == p + c + [tok.eos_id]
    assert labels == [IGNORE] * len(p) + c + [tok.eos_id]


def test_text_labels_are_every_token_and_eos(tok):
    [(ids, labels)] = encode_records([{"text": "To be, or not to be"}], tok)
    assert ids == tok.encode("To be, or not to be") + [tok.eos_id]
    assert labels == ids


def test_chat_rendering_and_masks(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hail."}, {"role": "user", "content": "More"},
                {"role": "assistant", "content": "No."}]
    [(ids, labels)] = encode_records([{"messages": messages}], tok)
    assert tok.decode(ids) == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHail.\n"
                               "<|user|>\nMore\n<|assistant|>\nNo.\n")
    expected_ids, expected_labels = [], []
    for m in messages:
        prefix, content, suffix = (tok.encode(f"<|{m['role']}|>\n"), tok.encode(m["content"]), tok.encode("\n"))
        scored = content + suffix + [tok.eos_id] if m["role"] == "assistant" else []
        expected_ids += prefix + (scored or content + suffix)
        expected_labels += [IGNORE] * len(prefix) + (scored or [IGNORE] * len(content + suffix))
    assert ids == expected_ids and labels == expected_labels
    # generation: the same rendering of the conversation so far, then the assistant's prefix
    prompt = chat_prompt(messages[:4], tok)
    assert prompt == ids[:ids.index(tok.eos_id) + 1] + tok.encode("<|user|>\nMore\n<|assistant|>\n")


def test_template_special_tokens_come_from_the_template_only(tok):
    sep = tok.special_tokens[SEP]
    cfg = RecordsConfig(template=SEP + "{role}: {content}\n")
    [(ids, labels)] = encode_records([{"messages": [{"role": "user", "content": SEP},
                                                    {"role": "assistant", "content": "ok"}]}], tok, cfg)
    assert ids.count(sep) == 2  # one per turn from the template; the SEP written in the user's text stays text
    assert tok.decode(ids) == f"{SEP}user: {SEP}\n{SEP}assistant: ok\n"
    assert [x for x in labels if x != IGNORE] == tok.encode("ok") + tok.encode("\n") + [tok.eos_id]


# --- packing -------------------------------------------------------------------------------


def strip(row_ids, row_labels):
    keep = [i for i, x in enumerate(row_ids) if x != PAD]
    assert keep == list(range(len(keep)))  # padding only at the end ...
    assert all(row_labels[i] == IGNORE for i in range(len(keep), len(row_ids)))  # ... and never scored
    return [row_ids[i] for i in keep], [row_labels[i] for i in keep]


@pytest.mark.parametrize("context", [40, 77])
def test_packing_keeps_every_example_whole_and_its_masks(tok, context):
    examples = encode_records(completions(40), tok)
    assert max(len(ids) for ids, _ in examples) <= context + 1
    ids, labels = pack_examples(examples, context, PAD)
    assert ids.shape == labels.shape == (ids.shape[0], context + 1) and ids.dtype == torch.long
    rows = [strip(i.tolist(), label.tolist()) for i, label in zip(ids, labels)]
    # the rows hold the examples in order, masks and all, each example inside one row
    assert sum((r[0] for r in rows), []) == sum((e[0] for e in examples), [])
    assert sum((r[1] for r in rows), []) == sum((e[1] for e in examples), [])
    k = 0
    for n, (row_ids, _) in enumerate(rows):
        used = 0
        while used < len(row_ids):
            assert row_ids[used:used + len(examples[k][0])] == examples[k][0]
            used += len(examples[k][0])
            k += 1
        assert used == len(row_ids)
        if n + 1 < len(rows):  # greedy: the next example did not fit
            assert used + len(examples[k][0]) > context + 1
    assert k == len(examples) and len(rows) < len(examples)


def test_no_packing_one_example_per_row(tok):
    examples = encode_records(completions(10), tok)
    ids, labels = pack_examples(examples, 32, PAD, pack=False)
    assert len(ids) == len(examples)
    for row_ids, row_labels, (e_ids, e_labels) in zip(ids.tolist(), labels.tolist(), examples):
        assert strip(row_ids, row_labels) == (e_ids, e_labels)


def test_a_long_example_is_cut_into_rows_that_score_each_token_once(tok):
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 3
    [(e_ids, e_labels)] = encode_records([{"text": text}], tok)
    context = 16
    assert len(e_ids) > 3 * (context + 1)
    ids, labels = pack_examples([(e_ids, e_labels)], context, PAD)
    x = [t for row in ids[:, :-1].tolist() for t in row if t != PAD]
    y = [t for row in labels[:, 1:].tolist() for t in row if t != IGNORE]
    assert x[:len(e_ids) - 1] == e_ids[:-1]  # every input in order, rows overlapping by one token
    assert y == e_labels[1:]  # every target exactly once


def test_rows_without_a_loss_token_are_dropped(tok):
    long_prompt = {"prompt": "the king my lord " * 10, "completion": " yes"}
    examples = encode_records([long_prompt], tok)
    ids, labels = pack_examples(examples, 8, PAD)
    assert all((row[1:] != IGNORE).any() for row in labels)
    assert [t for t in labels[:, 1:].flatten().tolist() if t != IGNORE] == tok.encode(" yes") + [tok.eos_id]


# --- the sampler and the split -------------------------------------------------------------


def test_sampler_is_a_pure_function_of_seed_and_start(tok):
    rows = pack_examples(encode_records(completions(60), tok), 12, PAD)
    n = rows[0].shape[0]
    a, b = RecordSampler(rows, seed=3), RecordSampler(rows, seed=3)
    b.batch(n + 5, 4)  # b has seen another epoch: it must not matter
    for start in (0, 7, n - 2, n + 5, 3 * n + 1):
        xa, ya = a.batch(start, 4)
        xb, yb = b.batch(start, 4)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x8, y8 = a.batch(0, 8)  # resume: samples 4..7 are the same whether asked with 0..7 or from 4
    x4, y4 = a.batch(4, 4)
    assert torch.equal(x8[4:], x4) and torch.equal(y8[4:], y4)
    x, y = a.batch(0, n)  # one epoch visits every row once, x and y shifted by one
    assert x.shape == y.shape == (n, 12) and x.dtype == y.dtype == torch.long
    order = a.rows(0, n)
    assert sorted(order) == list(range(n))
    assert torch.equal(x, rows[0][order, :-1]) and torch.equal(y, rows[1][order, 1:])
    assert a.rows(0, n) != RecordSampler(rows, seed=4).rows(0, n)
    assert a.rows(n, n) != order  # each epoch its own order


def test_val_split_is_disjoint_and_seeded():
    records = [{"text": str(i)} for i in range(100)]
    train, val = split_records(records, 0.2, seed=1)
    assert len(val) == 20 and len(train) == 80
    assert sorted(int(r["text"]) for r in train + val) == list(range(100))
    assert [int(r["text"]) for r in train] == sorted(int(r["text"]) for r in train)  # file order kept
    assert split_records(records, 0.2, seed=1) == (train, val)
    assert split_records(records, 0.2, seed=2)[1] != val
    assert split_records(records, 0, seed=1) == (records, [])
    assert len(split_records(records[:3], 0.01, seed=1)[1]) == 1  # at least one when asked for some
    with pytest.raises(DataError, match="1 record.*leave none for training"):
        split_records(records[:1], 0.1, seed=1)


def test_load_records_and_validation_batches(tok, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", completions(30))
    rs = load_records(path, tok, 16, RecordsConfig(val_fraction=0.2, seed=5))
    assert rs.format == "completion"
    assert rs.stats["train"]["records"] == 24 and rs.stats["val"]["records"] == 6
    assert rs.stats["train"]["rows"] == rs.train[0].shape[0] and rs.val[0].shape[1] == 17
    assert rs.stats["train"]["scored_tokens"] == int((rs.train[1][:, 1:] != IGNORE).sum())
    batches = val_batches(rs.val, batch_size=2, n_batches=10, seed=5)
    assert sum(len(x) for x, _ in batches) == rs.val[0].shape[0]
    again = val_batches(rs.val, batch_size=2, n_batches=10, seed=5)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert load_records(path, tok, 16, RecordsConfig(val_fraction=0)).val is None


# --- loss ----------------------------------------------------------------------------------


def test_model_loss_is_the_cross_entropy_of_the_unmasked_positions_only(tok):
    rows = pack_examples(encode_records(completions(12), tok), 16, tok.pad_id)
    x, y = RecordSampler(rows, seed=0).batch(0, 4)
    model = tiny_model(vocab_size=tok.vocab_size, block_size=32)
    with torch.no_grad():
        loss = model(x, y)
        logp = F.log_softmax(model(x).double(), dim=-1)
    scored = y != IGNORE
    assert 0 < scored.sum() < scored.numel()
    assert torch.equal(y[:, :-1][scored[:, :-1]], x[:, 1:][scored[:, :-1]])  # a target is the next input token
    by_hand = -logp[scored, y[scored]].mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    everything = -logp.gather(-1, rows[0][RecordSampler(rows, seed=0).rows(0, 4), 1:].unsqueeze(-1)).mean()
    assert abs(loss.item() - everything.item()) > 1e-3  # the masked positions would change it


# --- reading files: errors name file:line --------------------------------------------------


def test_read_records_formats_and_max_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "id": 1}, "", {"text": "b"}, {"text": "c"}])
    assert read_records(path) == ("text", [{"text": "a", "id": 1}, {"text": "b"}, {"text": "c"}])
    assert read_records(path, RecordsConfig(max_records=2))[1] == [{"text": "a", "id": 1}, {"text": "b"}]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    assert read_records(chat)[0] == "chat"


BAD = [
    ("malformed JSON", [{"text": "a"}, '{"text": "b"'], None, 2, "not valid JSON"),
    ("not an object", ['["text"]'], None, 1, "expected a JSON object"),
    ("another format than the first", [{"text": "a"}, "", {"prompt": "p", "completion": "c"}], None, 3,
     "a completion record in a file of text records"),
    ("no completion, auto", [{"prompt": "p", "completion": "c"}, {"prompt": "q"}], None, 2,
     "lacks \"completion\""),
    ("completion mode, text records", [{"text": "a"}], "completion", 1, "has no \"completion\""),
    ("missing prompt", [{"completion": "c"}], None, 1, "lacks 'prompt'"),
    ("non-string field", [{"text": "a"}, {"text": 5}], None, 2, "'text' must be a string, got a number"),
    ("empty text", [{"text": ""}], None, 1, "'text' is empty"),
    ("no known key", [{"question": "a"}], None, 1, "no key of any record format"),
    ("keys of two formats", [{"text": "a", "prompt": "b"}], None, 1, "keys of several"),
    ("unknown role", [{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}], None, 1,
     "message 2: unknown role 'robot'"),
    ("message without content", [{"messages": [{"role": "assistant"}]}], None, 1, "message 1: the record lacks"),
    ("messages not a list", [{"messages": "hi"}], None, 1, "non-empty list"),
    ("last message not the assistant's", [{"messages": [{"role": "user", "content": "a"}]}], None, 1,
     "last message must be the assistant's"),
]


@pytest.mark.parametrize("lines,fmt,line,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_records_name_file_and_line(tmp_path, lines, fmt, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    cfg = RecordsConfig(format=fmt) if fmt else None
    with pytest.raises(DataError) as e:
        read_records(path, cfg)
    assert f"{path}:{line}:" in str(e.value) and message in str(e.value)


def test_empty_file_is_refused(tmp_path):
    for text in ("", "\n  \n"):
        (tmp_path / "e.jsonl").write_text(text)
        with pytest.raises(DataError, match="holds no records"):
            read_records(tmp_path / "e.jsonl")


# --- config --------------------------------------------------------------------------------


def test_records_config_round_trips_and_is_checked():
    assert_round_trips(RecordsConfig(format="chat", template="[{role}] {content}\n", pack=False, val_fraction=0.25,
                                     seed=3, max_records=10))
    for bad in (dict(template="{role}: text"), dict(template="{content}"), dict(template="{role}{content}{content}"),
                dict(val_fraction=0.6), dict(format="json"), dict(max_records=0), dict(seed=-1)):
        with pytest.raises(ConfigError):
            RecordsConfig(**bad)
