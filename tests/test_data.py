"""lbdl_cli/data.py: documents, deterministic train/val shards, meta.json, load_shards, and the CLI."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_round_trips
from hypothesis import given, settings
from hypothesis import strategies as st

from lbdl_cli.data import (
    PrepareConfig,
    check_tokenizer,
    info,
    iter_documents,
    load_shards,
    prepare,
    read_meta,
    token_dtype,
)
from lbdl_cli.errors import ConfigError, DataError
from lbdl_cli.progress import collect
from tokenizer import Tokenizer, file_hash, train

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def lines_of(text: str) -> list[str]:
    if "\r" not in text:
        return text.splitlines(keepends=True)
    return [line for line in text.replace("\n", "\n\0").split("\0") if line]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    return write(tmp_path_factory.mktemp("corpus") / "shakespeare.txt", text)


@pytest.fixture(scope="session")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    train([corpus], 600, out=out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def shards(corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    prepare([corpus], tok_dir, out, val_fraction=0.1, seed=5)
    return out


def split_docs(tokens, tok: Tokenizer) -> list[str]:
    """Decode a shard back into its documents (each ends with <eos>)."""
    ids = np.asarray(tokens).tolist()
    assert not ids or ids[-1] == tok.eos_id
    docs, start = [], 0
    for k, i in enumerate(ids):
        if i == tok.eos_id:
            docs.append(tok.decode(ids[start:k]))
            start = k + 1
    return docs


# --- documents ---------------------------------------------------------------------------


def test_paragraph_documents_known_answer():
    text = "\n\nA\nB\n\nC\n\n\nD\r\n \r\nE"
    assert list(iter_documents(lines_of(text))) == ["\n\nA\nB\n\n", "C\n\n\n", "D\r\n \r\n", "E"]
    assert list(iter_documents(lines_of(text), "line")) == ["\n\nA\n", "B\n\n", "C\n\n\n", "D\r\n \r\n", "E"]
    assert list(iter_documents(lines_of(text), "file")) == [text]
    assert list(iter_documents([])) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b c", "", " ", "\t"]), max_size=30).map(
    lambda lines: "".join(line + "\n" for line in lines)), st.sampled_from(["paragraph", "line", "file"]))
def test_documents_join_back_to_the_file(text, split_on):
    docs = list(iter_documents(lines_of(text), split_on))
    assert "".join(docs) == text
    assert all(docs)
    assert sum(1 for d in docs if d.strip()) == len(docs) or not text.strip()


def test_token_dtype():
    assert token_dtype(4096) == "uint16"
    assert token_dtype(65536) == "uint16"  # ids 0..65535
    assert token_dtype(65537) == "uint32"


# --- prepare -------------------------------------------------------------------------------


def test_shards_hold_every_document_exactly_once(shards, corpus, tok):
    train_ids, val_ids, meta = load_shards(shards)
    train_docs, val_docs = split_docs(train_ids, tok), split_docs(val_ids, tok)
    original = list(iter_documents(lines_of(corpus.read_text(encoding="utf-8"))))
    assert len(train_docs) + len(val_docs) == len(original) == meta["sources"][0]["documents"]
    # in file order, each document is the next one of exactly one of the two shards
    t = v = 0
    for doc in original:
        if t < len(train_docs) and train_docs[t] == doc:
            t += 1
        else:
            assert val_docs[v] == doc
            v += 1
    assert (t, v) == (len(train_docs), len(val_docs))
    assert collections.Counter(train_docs) + collections.Counter(val_docs) == collections.Counter(original)
    assert 0.05 < len(val_docs) / len(original) < 0.15
    # val.txt is the held-out text itself: exactly the validation documents, in order
    assert (shards / "val.txt").read_text(encoding="utf-8") == "".join(val_docs)


def test_meta(shards, corpus, tok_dir, tok):
    train_ids, val_ids, meta = load_shards(shards)
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16" and train_ids.dtype == np.uint16
    assert meta["vocab_size"] == 600
    assert meta["train_tokens"] == len(train_ids) and meta["val_tokens"] == len(val_ids)
    assert meta["tokenizer_sha256"] == file_hash(tok_dir) == file_hash(shards)  # tokenizer.model copied beside
    source = meta["sources"][0]
    assert source["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert source["bytes"] == corpus.stat().st_size == meta["train_bytes"] + meta["val_bytes"]
    assert meta["val_fraction"] == 0.1 and meta["seed"] == 5 and meta["split_on"] == "paragraph"
    assert meta["eos_id"] == tok.eos_id and meta["bos"] is False and meta["eos_after_document"] is True
    n_eos = int((np.asarray(train_ids) == tok.eos_id).sum() + (np.asarray(val_ids) == tok.eos_id).sum())
    assert n_eos == meta["train_documents"] + meta["val_documents"]
    assert isinstance(train_ids, np.memmap) and not train_ids.flags.writeable


def test_tokens_equal_the_tokenizer_encoding(shards, corpus, tok):
    train_ids, val_ids, _ = load_shards(shards)
    docs = list(iter_documents(lines_of(corpus.read_text(encoding="utf-8"))))
    total = sum(len(tok.encode(d)) + 1 for d in docs)
    assert total == len(train_ids) + len(val_ids)


def test_deterministic_for_a_seed(shards, corpus, tok_dir, tmp_path):
    again = tmp_path / "again"
    prepare([corpus], tok_dir, again, val_fraction=0.1, seed=5)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.model"):
        assert (again / name).read_bytes() == (shards / name).read_bytes()
    other = tmp_path / "other"
    prepare([corpus], tok_dir, other, val_fraction=0.1, seed=6)
    assert (other / "val.bin").read_bytes() != (shards / "val.bin").read_bytes()


def test_many_files_globs_and_line_documents(tok_dir, tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:30_000]
    for k in range(3):
        write(tmp_path / "in" / f"part{k}.txt", text[k * 10_000:(k + 1) * 10_000])
    out = tmp_path / "out"
    result = prepare([str(tmp_path / "in" / "*.txt")], tok_dir, out, split_on="line", val_fraction=0.2)
    assert [Path(s["path"]).name for s in result["sources"]] == ["part0.txt", "part1.txt", "part2.txt"]
    n_lines = sum(1 for line in text.splitlines() if line.strip())
    assert result["train_documents"] + result["val_documents"] == n_lines + 2  # two files cut mid-line
    assert result["train_bytes"] + result["val_bytes"] == 30_000


def test_val_fraction_zero(tok_dir, corpus, tmp_path):
    result = prepare([corpus], tok_dir, tmp_path / "all", val_fraction=0)
    train_ids, val_ids, meta = load_shards(tmp_path / "all")
    assert len(val_ids) == 0 and meta["val_documents"] == 0 and len(train_ids) == result["train_tokens"]


def test_invalid_utf8_replace(tok_dir, tmp_path):
    body = SHAKESPEARE.read_text(encoding="utf-8")[:5000].encode()
    path = write(tmp_path / "latin1.txt", body + b"\n\ncaf\xe9 au lait\n\n" + body)
    result = prepare([path], tok_dir, tmp_path / "out", invalid_utf8="replace")
    assert result["invalid_utf8_lines"] == 1
    train_ids, val_ids, _ = load_shards(tmp_path / "out")
    text = Tokenizer.load(tok_dir).decode(np.concatenate([train_ids, val_ids]))
    assert "caf\ufffd au lait" in text


def test_config_validation():
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 0.5\]"):
        PrepareConfig(val_fraction=0.9)
    with pytest.raises(ConfigError, match="split_on"):
        PrepareConfig(split_on="sentence")


@pytest.mark.parametrize("config", [PrepareConfig(), PrepareConfig(val_fraction=0.0, seed=9, split_on="file",
                                                                    invalid_utf8="replace", num_threads=1)])
def test_config_round_trips(config):
    assert_round_trips(config)


def test_config_refuses_unknown_keys_and_values_by_name():
    with pytest.raises(ConfigError, match="prepare config: unknown key 'split'"):
        PrepareConfig.from_dict({"split": "line"})
    with pytest.raises(ConfigError, match="invalid_utf8 must be one of error, replace, skip, got 'ignore'"):
        PrepareConfig(invalid_utf8="ignore")
    with pytest.raises(ConfigError, match="num_threads"):
        PrepareConfig(num_threads=-1)


def test_prepare_takes_a_config_and_reports_bytes_read(shards, corpus, tok_dir, tmp_path, monkeypatch):
    import lbdl_cli.data as data

    monkeypatch.setattr(data, "BATCH_CHARS", 50_000)
    events = []
    out = tmp_path / "again"
    copy = write(tmp_path / "copy.txt", corpus.read_bytes())
    prepare([corpus, copy], tok_dir, out, config=PrepareConfig(val_fraction=0.1, seed=5), progress=collect(events))
    size = corpus.stat().st_size
    assert {(e.stage, e.unit, e.total) for e in events} == {("tokenizing", "bytes", 2 * size)}
    done = [e.done for e in events]
    assert done == sorted(done) and done[-1] == 2 * size and size in done and len(done) > 4
    before = load_shards(shards)[0]  # the first file alone, with the same settings: the same first documents
    assert np.array_equal(load_shards(out)[0][:len(before)], before)
    with pytest.raises(TypeError, match="not both"):
        prepare([corpus], tok_dir, tmp_path / "x", config=PrepareConfig(), seed=5)


def test_info_is_the_checked_meta(shards, tmp_path):
    assert info(shards) == {"path": str(shards), **read_meta(shards)}
    with pytest.raises(DataError, match="no meta.json"):
        info(tmp_path)


# --- load_shards and the tokenizer check ------------------------------------------------


def test_tokenizer_mismatch_is_refused(shards, corpus, tmp_path):
    other = tmp_path / "other-tok"
    train([corpus], 500, out=other)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes((other / "tokenizer.model").read_bytes())
    with pytest.raises(DataError, match="different tokenizer") as info:
        load_shards(shards, tokenizer=model_dir)
    assert file_hash(model_dir)[:12] in str(info.value) and "lbdl data prepare" in str(info.value)
    meta = read_meta(shards)
    check_tokenizer(meta, shards / "tokenizer.model")  # the same file: no error
    load_shards(shards, tokenizer=shards)


def test_truncated_or_missing_shards(shards, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="truncated"):
        load_shards(broken)
    with pytest.raises(DataError, match="no meta.json"):
        load_shards(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_shards(tmp_path / "nope")
    (broken / "meta.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        load_shards(broken)


def test_uint32_shards_load(tmp_path, cli):
    d = tmp_path / "big-vocab"
    d.mkdir()
    np.array([70_000, 1, 2], dtype=np.uint32).tofile(d / "train.bin")
    np.array([65_537], dtype=np.uint32).tofile(d / "val.bin")
    meta = {"format_version": 1, "dtype": "uint32", "vocab_size": 80_000, "tokenizer_sha256": "0" * 64,
            "train_tokens": 3, "val_tokens": 1}
    (d / "meta.json").write_text(json.dumps(meta))
    train_ids, val_ids, _ = load_shards(d)
    assert train_ids.tolist() == [70_000, 1, 2] and val_ids.tolist() == [65_537]
    # a meta.json with only the required keys (and a byte-order mark, as Windows editors write) shows too
    (d / "meta.json").write_text("\ufeff" + json.dumps(meta))
    r = cli("data", "info", d)
    assert r.code == 0 and "3 tokens" in r.out and "uint32 (vocabulary 80,000)" in r.out


# --- CLI -----------------------------------------------------------------------------------




def test_cli_prepare_and_info(corpus, tok_dir, tmp_path, cli):
    out = tmp_path / "shards"
    code, stdout, err = cli("data", "prepare", corpus, "--tokenizer", tok_dir, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["train_tokens"] == len(load_shards(out)[0]) and result["val_fraction"] == 0.1
    code, stdout, _ = cli("data", "info", out)
    assert code == 0 and f"{result['train_tokens']:,} tokens" in stdout
    code, stdout, _ = cli("data", "prepare", corpus, "--tokenizer", tok_dir, "--out", out, "--force",
                          "--seed", 9, "--val-fraction", 0.2)
    assert code == 0 and read_meta(out)["seed"] == 9 and "wrote" in stdout


def bad_cases(tmp: Path, tok_dir: Path) -> dict[str, tuple[list, str]]:
    good = write(tmp / "good.txt", SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    empty = write(tmp / "empty.txt", "")
    binary = write(tmp / "blob.bin", bytes(range(256)) * 4)
    latin1 = write(tmp / "latin1.txt", "First line\nna\u00efve ".encode() + b"caf\xe9\n")
    one_doc = write(tmp / "one.txt", "a single paragraph\nwith two lines\n")
    fake = write(tmp / "fake" / "tokenizer.model", b"\x00\x01 not a model")
    (tmp / "existing").mkdir(exist_ok=True)
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 600, "tokenizer_sha256": "0" * 64,
            "train_tokens": 3, "val_tokens": 1}
    metas = {"binary": bytes(range(256)), "array": "[1, 2]\n", "line 3": '{"format_version": 1,\n "dtype": "uint16"\n',
             "count": json.dumps({**meta, "train_tokens": "3"}),
             "version": json.dumps({**meta, "format_version": True})}
    for name, data in metas.items():
        write(tmp / f"meta-{name}" / "meta.json", data)
        write(tmp / f"meta-{name}" / "train.bin", np.zeros(3, np.uint16).tobytes())
        write(tmp / f"meta-{name}" / "val.bin", np.zeros(1, np.uint16).tobytes())
    cmd = ["data", "prepare"]
    out = ["--out", tmp / "out"]
    return {
        "missing file": ([*cmd, tmp / "nope.txt", "--tokenizer", tok_dir, *out], "file not found"),
        "empty corpus": ([*cmd, empty, "--tokenizer", tok_dir, *out], "corpus is empty"),
        "binary file": ([*cmd, good, binary, "--tokenizer", tok_dir, *out], "binary file (NUL byte at offset 0)"),
        "invalid UTF-8": ([*cmd, latin1, "--tokenizer", tok_dir, *out],
                          f"{latin1} is not valid UTF-8: byte 0xe9 at offset 21"),
        "not a sentencepiece model": ([*cmd, good, "--tokenizer", fake.parent, *out], "not a sentencepiece model"),
        "missing tokenizer": ([*cmd, good, "--tokenizer", tmp / "no-tok", *out], "tokenizer not found"),
        "output exists": ([*cmd, good, "--tokenizer", tok_dir, "--out", tmp / "existing"], "already exists"),
        "too few documents for val": ([*cmd, one_doc, "--tokenizer", tok_dir, *out], "no document went to val.bin"),
        "bad val fraction": ([*cmd, good, "--tokenizer", tok_dir, *out, "--val-fraction", 2],
                             "val_fraction must be in [0, 0.5], got 2"),
        "info on a non-shard dir": (["data", "info", tmp / "existing"], "no meta.json"),
        "meta.json binary": (["data", "info", tmp / "meta-binary"],
                             f"{tmp / 'meta-binary' / 'meta.json'} is not UTF-8 text (byte 128)"),
        "meta.json an array": (["data", "info", tmp / "meta-array"],
                               f"{tmp / 'meta-array' / 'meta.json'} must hold a JSON object, not array"),
        "meta.json broken at line 3": (["data", "info", tmp / "meta-line 3"],
                                       f"{tmp / 'meta-line 3' / 'meta.json'} is not valid JSON (line 3, column 1"),
        "meta.json count not an integer": (["data", "info", tmp / "meta-count"],
                                           "meta.json: train_tokens must be an integer >= 0, got '3'"),
        "meta.json version true": (["data", "info", tmp / "meta-version"], "has format_version True"),
        "train on a broken meta.json": (["train", "--data", tmp / "meta-line 3", "--out", tmp / "out",
                                         "--preset", "nano", "--max-steps", 1],
                                        f"{tmp / 'meta-line 3' / 'meta.json'} is not valid JSON (line 3, column 1"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty corpus", "binary file", "invalid UTF-8",
                                  "not a sentencepiece model", "missing tokenizer", "output exists",
                                  "too few documents for val", "bad val fraction", "info on a non-shard dir",
                                  "meta.json binary", "meta.json an array", "meta.json broken at line 3",
                                  "meta.json count not an integer", "meta.json version true",
                                  "train on a broken meta.json"])
def test_cli_bad_input_exit_2_one_line_nothing_written(case, tmp_path, tok_dir, cli):
    argv, message = bad_cases(tmp_path, tok_dir)[case]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, stdout, err = cli(*argv)
    assert code == 2, (stdout, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("lbdl: error:") and message in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, no temp dir left
