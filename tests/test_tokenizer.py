"""tokenizer/: exact round trips, special tokens, training reports, bad input, and the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import assert_round_trips
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbdl_cli.errors import ConfigError, DataError, LbdlError
from lbdl_cli.progress import collect
from tokenizer import (
    DecodeConfig,
    EncodeConfig,
    InspectConfig,
    Tokenizer,
    TokenizerConfig,
    decode_ids,
    encode_text,
    file_hash,
    inspect_tokenizer,
    train,
)
from tokenizer import core as tok_core

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
VOCAB = 800
SPECIALS = ["<|user|>", "<|assistant|>"]
EXTRA_TEXT = """\
def f(x):
\treturn x  # tabs and    runs of spaces
Ein Beispiel: Größe, Straße, naïve café.
日本語のテキストと中文文本。
Emoji: 😀🎉 and combining: e\u0301 a\u0308
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of Shakespeare plus a little code, accents, CJK and emoji."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:150_000] + "\n" + EXTRA_TEXT * 20
    return write(tmp_path_factory.mktemp("corpus") / "small.txt", text)


@pytest.fixture(scope="session")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    train([corpus], VOCAB, out=out, special_tokens=SPECIALS, seed=7)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


# --- round trips ------------------------------------------------------------------------

KNOWN = [
    "", " ", "  ", "a", "  two leading", "trailing two  ", "a  b   c    d", "\t", "\ta\tb\t",
    "\n", "\n\n\n", "line\n", "\nline", "a\r\nb\r\n", "\r", "a\rb", "\r\n\r\n", "mixed \n \r\n \r end",
    "😀", "👩\u200d👩\u200d👧", "🇫🇷", "日本語の文章", "中文", "e\u0301", "a\u0308\u0301", "\u00e9 vs e\u0301",
    "\u2581", " \u2581 ", "\u2581\u2581x\u2581", "\x00", "\x01\x7f\x1b[0m", "\ufeffBOM", "\u200b", "\u2028\u2029",
    "\u3000full-width space", "\uff21\uff22", "ﬁ ligature", "<|user|>", "<bos>", "<unk>", "<0x41>",
    "To be, or not to be: that is the question.\n\nFirst Citizen:\nSpeak, speak.\n",
    "x" * 10_000, " " * 5000, ("line with words\n" * 2000),
]


@pytest.mark.parametrize("text", KNOWN, ids=range(len(KNOWN)))
def test_round_trip_known_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_string(tok, text):
    assert tok.decode(tok.encode(text)) == text


ATOMS = [" ", "  ", "\n", "\r", "\r\n", "\t", "\u2581", "a", "e", "\u0301", "😀", "中", "<|user|>", "<eos>",
         "the", "The", "Citizen", "0", "12", "\x00", "\u00a0"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), max_size=40).map("".join), st.booleans(), st.booleans(), st.booleans())
def test_round_trip_whitespace_and_markers(tok, text, bos, eos, allow_special):
    ids = tok.encode(text, bos=bos, eos=eos, allow_special=allow_special)
    assert tok.decode(ids) == text
    assert (ids[:1] == [tok.bos_id]) == bos
    assert (ids[-1:] == [tok.eos_id]) == eos


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300))
def test_ordinary_text_never_yields_special_ids(tok, text):
    ids = tok.encode(text + "<|user|><bos><eos><pad>")
    assert not any(tok.is_special(i) for i in ids)


def test_sentencepiece_oracle_same_ids_and_text(tok, sp):
    """The saved file is a plain sentencepiece model; on text without U+2581 both give the same ids."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[200_000:260_000] + EXTRA_TEXT
    assert "\u2581" not in text
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.get_piece_size() == tok.vocab_size == VOCAB
    # identity normalisation: sentencepiece keeps the text as written
    assert sp.normalize("  Größe\t e\u0301 \uff21 ") == "  Größe\t e\u0301 \uff21 ".replace(" ", "\u2581")


def test_chunked_encoding_gives_the_same_ids(tok, sp, monkeypatch):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
    expected = sp.encode(text)
    monkeypatch.setattr(tok_core, "CHUNK_CHARS", 7)
    assert tok.encode(text) == expected
    assert tok.encode_concat([text, text]).tolist() == expected + expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(ATOMS + ["\n\n", "word word"]), max_size=60).map("".join))
def test_chunk_size_does_not_change_ids(tok, text):
    whole = tok.encode(text)
    old = tok_core.CHUNK_CHARS
    try:
        tok_core.CHUNK_CHARS = 3
        assert tok.encode(text) == whole
    finally:
        tok_core.CHUNK_CHARS = old


def test_batch_encode_matches_single(tok):
    texts = ["hello world", "", "\n\n", "  x \u2581 y", "<|user|> hi"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True, allow_special=True) == [
        tok.encode(t, bos=True, eos=True, allow_special=True) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts
    flat = tok.encode_concat(texts, eos=True).tolist()
    assert flat == [i for t in texts for i in tok.encode(t) + [tok.eos_id]]


def test_literal_space_mark_is_not_a_space(tok):
    ids = tok.encode("\u2581")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE2>", "<0x96>", "<0x81>"]
    assert tok.encode(" ") != ids


def test_line_breaks_are_single_tokens(tok):
    n, r = tok.piece_to_id("\n"), tok.piece_to_id("\r")
    assert tok.encode("\n") == [n]
    assert tok.encode("\r\n") == [r, n]
    assert tok.encode("\r") == [r]


# --- special tokens ------------------------------------------------------------------------


def test_special_token_ids(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<bos>", "<eos>", "<pad>"]
    assert tok.user_special_tokens == SPECIALS
    assert tok.special_tokens == {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, "<|user|>": 4, "<|assistant|>": 5}
    assert tok.byte_fallback


def test_user_special_tokens_only_when_asked(tok):
    user, assistant = tok.special_tokens["<|user|>"], tok.special_tokens["<|assistant|>"]
    text = "<|user|>Who art thou?<|assistant|>A citizen."
    plain = tok.encode(text)
    assert user not in plain and assistant not in plain
    special = tok.encode(text, allow_special=True)
    assert special[0] == user and special.count(user) == 1 and special.count(assistant) == 1
    assert special[1:special.index(assistant)] == tok.encode("Who art thou?")
    assert tok.encode("<|user|>", allow_special=True) == [user]
    assert tok.decode(special) == text
    assert tok.decode(special, skip_special=True) == "Who art thou?A citizen."
    # <bos>/<eos> decode to nothing, so they never come from text: only from bos=/eos=
    assert tok.encode("<bos>x<eos>", allow_special=True) == tok.encode("<bos>x<eos>")


def test_bos_eos_pad_decode_to_nothing(tok):
    ids = tok.encode("hi there", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode([tok.pad_id] + ids + [tok.pad_id]) == "hi there"


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(DataError, match="lone surrogate '\\\\ud800' at index 1"):
        tok.encode("a\ud800b")


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(DataError, match="out of range"):
        tok.decode([5, VOCAB])
    with pytest.raises(DataError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(DataError, match="out of range"):
        tok.id_to_piece(VOCAB)


# --- files, hashes, loading ----------------------------------------------------------------


def test_load_dir_or_file_and_hash(tok_dir, tok):
    file = tok_dir / "tokenizer.model"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert file_hash(tok_dir) == file_hash(file) == tok.sha256 == digest
    from_file = Tokenizer.load(file)
    assert from_file.encode("Speak, speak.") == tok.encode("Speak, speak.")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_sha256"] == digest and config["user_special_tokens"] == SPECIALS


def test_model_dir_with_only_tokenizer_model(tok_dir, tok, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    loaded = Tokenizer.load(model_dir)
    assert loaded.report is None
    assert loaded.user_special_tokens == SPECIALS  # read from the model file itself
    assert loaded.encode("x<|user|>", allow_special=True) == tok.encode("x<|user|>", allow_special=True)


def test_foreign_sentencepiece_model_is_used_as_is(tmp_path):
    """A model trained with sentencepiece's defaults (NFKC, dummy prefix, no byte fallback) loads and
    encodes exactly as sentencepiece does: no chunking or U+2581 handling that would change its ids."""
    import io as _io

    lines = SHAKESPEARE.read_text(encoding="utf-8")[:30_000].splitlines()
    writer = _io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, model_type="bpe",
                                   vocab_size=300, minloglevel=2)
    path = write(tmp_path / "foreign.model", writer.getvalue())
    foreign = Tokenizer.load(path)
    plain = spm.SentencePieceProcessor(model_file=str(path))
    assert foreign.exact is False
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 300) + "x\u2581y"
    assert foreign.encode(text) == plain.encode(text)
    assert foreign.decode(plain.encode("hear me")) == "hear me"


def test_lbdl_tokenizer_is_exact(tok):
    assert tok.exact is True


@pytest.mark.parametrize("content", [b"", b"not a model at all\n", bytes(range(256)) * 8])
def test_not_a_sentencepiece_model(tmp_path, content):
    path = write(tmp_path / "tokenizer.model", content)
    with pytest.raises(DataError, match="sentencepiece model"):
        Tokenizer.load(path)
    with pytest.raises(DataError, match="sentencepiece model"):
        Tokenizer.load(tmp_path)


def with_piece_not_utf8(tok_dir: Path) -> tuple[bytes, int]:
    """tok_dir's model file with the first byte of its last piece (a field of the protobuf) made 0xff: the
    file still parses, but that piece is not UTF-8; and the piece's id."""
    model, last = (tok_dir / "tokenizer.model").read_bytes(), Tokenizer.load(tok_dir).vocab_size - 1
    word = Tokenizer.load(tok_dir).id_to_piece(last).encode("utf-8")
    at = model.find(b"\x0a" + bytes([len(word)]) + word)
    assert at >= 0
    return model[:at + 2] + b"\xff" + model[at + 3:], last


def test_model_file_with_a_piece_that_is_not_utf8(tok_dir, tmp_path):
    damaged, id = with_piece_not_utf8(tok_dir)
    path = write(tmp_path / "tokenizer.model", damaged)
    with pytest.raises(DataError, match=f"{path} is not a usable sentencepiece model: piece {id} is not UTF-8 "
                                        f"text \\(byte 0xff\\)"):
        Tokenizer.load(path)


@pytest.mark.parametrize("config", [b"{\"format_version\": 1,\n", bytes(range(256)), b"[1, 2]", b"\"text\"",
                                    b'{"training": "not a report"}', b'{"training": [1]}'])
def test_unusable_tokenizer_config_is_ignored(tok_dir, tok, tmp_path, config, cli):
    """tokenizer_config.json is informational (the model file is the tokenizer): one that is not JSON,
    not a table, or whose training report is not one, is left out, and the tokenizer loads as without it."""
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes(config)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.report is None and loaded.user_special_tokens == SPECIALS
    assert loaded.encode("Speak, <|user|>", allow_special=True) == tok.encode("Speak, <|user|>", allow_special=True)
    code, stdout, err = cli("tokenizer", "inspect", tmp_path, "--json")
    assert code == 0 and err == "" and json.loads(stdout.strip().splitlines()[-1])["training"] is None


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(DataError, match="no tokenizer.model"):
        Tokenizer.load(tmp_path)


# --- training ------------------------------------------------------------------------------


def test_report(tok):
    r = tok.report
    assert r["vocab_size"] == VOCAB
    assert r["heldout_lines"] > 0 and r["compression"]["text"] == "held-out lines"
    c = r["compression"]
    assert c["chars_per_token"] == pytest.approx(c["chars"] / c["tokens"])
    assert c["bytes"] > c["chars"]  # the corpus has non-ASCII text
    assert 1.5 < c["chars_per_token"] < 6
    lengths = [len(p) for p in r["longest_pieces"]]
    assert lengths == sorted(lengths, reverse=True) and len(lengths) == 10
    assert r["sampled"] is False and r["training_lines"] == r["training_lines_available"]
    assert r["seconds"] >= r["sentencepiece_seconds"] > 0
    assert r["sentencepiece"]["normalization_rule_name"] == "identity"


def test_training_is_deterministic(corpus, tmp_path):
    a = train([corpus], 400, seed=3, max_lines=2000)
    b = train([corpus], 400, seed=3, max_lines=2000)
    assert a.model_bytes == b.model_bytes
    assert a.report["sampled"] and a.report["training_lines"] == 2000
    assert "reservoir sample of 2,000 of" in a.report["sampling"]


def test_globs_and_many_files(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:90_000]
    parts = [text[i:i + 30_000] for i in range(0, 90_000, 30_000)]
    for k, part in enumerate(parts):
        write(tmp_path / "corpus" / f"part{k}.txt", part)
    write(tmp_path / "corpus" / "deeper" / "part9.txt", parts[0])
    listed = train([tmp_path / "corpus" / f"part{k}.txt" for k in range(3)], 400, heldout_fraction=0)
    globbed = train([str(tmp_path / "corpus" / "*.txt")], 400, heldout_fraction=0)
    assert globbed.report["files"] == listed.report["files"]
    assert globbed.model_bytes == listed.model_bytes
    recursive = train([str(tmp_path / "corpus" / "**" / "*.txt")], 400, heldout_fraction=0)
    assert len(recursive.report["files"]) == 4
    assert recursive.report["compression"]["text"].startswith("training lines")


def test_split_digits(tmp_path):
    numbers = "".join(f"in 1999 and 2024 paid {i * 37} pounds\n" for i in range(3000))
    corpus = write(tmp_path / "numbers.txt", SHAKESPEARE.read_text(encoding="utf-8")[:30_000] + numbers)
    split = train([corpus], 400, heldout_fraction=0)
    assert all(len(p) == 1 for p in split.pieces("20241999") if p.isdigit())
    joined = train([corpus], 400, heldout_fraction=0, split_digits=False)
    assert len(joined.encode("1999")) < 4


def test_large_corpus_is_streamed_and_sampled(tmp_path):
    """A corpus many times max_lines: memory holds the sample, and the sample is reproducible."""
    line = "the quick brown fox jumps over the lazy dog {} times\n"
    write(tmp_path / "big.txt", "".join(line.format(i) for i in range(60_000)))
    tok = train([tmp_path / "big.txt"], 300, max_lines=500, seed=1)
    r = tok.report
    assert r["training_lines"] == 500 and r["sampled"]
    assert r["training_lines_available"] + r["heldout_lines"] == 60_000


# --- bad input -----------------------------------------------------------------------------


def bad_inputs(tmp: Path) -> dict[str, tuple[list, dict, str]]:
    """name -> (files, train options, expected message fragment)."""
    good = write(tmp / "good.txt", SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    empty = write(tmp / "empty.txt", "")
    blank = write(tmp / "blank.txt", "\n \n\t\n")
    binary = write(tmp / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    bad_utf8 = write(tmp / "latin1.txt", "hello\ncaf".encode() + b"\xe9 au lait\n")
    cjk = write(tmp / "cjk.txt", ("".join(chr(0x4E00 + i) for i in range(400)) + "\n") * 20)
    tiny = write(tmp / "tiny.txt", "hello world\n" * 10)
    return {
        "missing file": ([tmp / "nope.txt"], {}, "file not found"),
        "glob matches nothing": ([str(tmp / "*.nope")], {}, "no file matches"),
        "empty corpus": ([empty], {}, "corpus is empty"),
        "whitespace-only corpus": ([empty, blank], {}, "corpus is empty"),
        "binary file": ([good, binary], {}, "binary file"),
        "invalid UTF-8": ([bad_utf8], {}, f"{bad_utf8} is not valid UTF-8: byte 0xe9 at offset 9"),
        "vocabulary below the reserved ids": ([good], {"vocab_size": 200}, "too small"),
        "vocabulary too small for the corpus characters": ([cjk], {"vocab_size": 300, "character_coverage": 1.0},
                                                           "too small for this corpus"),
        "vocabulary too large for the corpus": ([tiny], {"vocab_size": 1000},
                                                "too large for this corpus: it supports at most"),
        "special token with a space": ([good], {"special_tokens": ["<|a b|>"]}, "whitespace"),
    }


BAD_CASES = ["missing file", "glob matches nothing", "empty corpus", "whitespace-only corpus", "binary file",
             "invalid UTF-8", "vocabulary below the reserved ids", "vocabulary too small for the corpus characters",
             "vocabulary too large for the corpus", "special token with a space"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_one_line_error_and_writes_nothing(tmp_path, case):
    files, options, message = bad_inputs(tmp_path)[case]
    options = {"vocab_size": 400, **options}
    out = tmp_path / "out"
    with pytest.raises(LbdlError) as info:
        train(files, out=out, **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_invalid_utf8_explicit_options(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    corpus = write(tmp_path / "mixed.txt", text.encode() + b"\ncaf\xe9 au lait\n" + text.encode())
    replaced = train([corpus], 400, invalid_utf8="replace")
    skipped = train([corpus], 400, invalid_utf8="skip")
    assert replaced.report["invalid_utf8_lines"] == skipped.report["invalid_utf8_lines"] == 1
    assert replaced.report["lines"] == skipped.report["lines"] + 1


def test_existing_output_refused_unless_force(corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        train([corpus], 400, out=out)
    assert (out / "keep.txt").read_text() == "mine"
    train([corpus], 400, out=out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]


def test_config_validation():
    with pytest.raises(ConfigError, match="vocabulary size 100 is too small"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="listed twice"):
        TokenizerConfig(vocab_size=500, special_tokens=("<a>", "<a>"))
    with pytest.raises(ConfigError, match="always present"):
        TokenizerConfig(vocab_size=500, special_tokens=("<eos>",))
    with pytest.raises(ConfigError, match="byte piece"):
        TokenizerConfig(vocab_size=500, special_tokens=("<0x41>",))
    with pytest.raises(ConfigError, match="invalid_utf8"):
        TokenizerConfig(vocab_size=500, invalid_utf8="ignore")
    assert TokenizerConfig(vocab_size=4096).to_dict()["vocab_size"] == 4096


@pytest.mark.parametrize("config", [
    TokenizerConfig(), TokenizerConfig(vocab_size=500, special_tokens=("<|user|>", "<|tool|>"), character_coverage=1.0,
                                       split_digits=False, max_lines=0, heldout_fraction=0.0, seed=3,
                                       invalid_utf8="skip", num_threads=2),
    EncodeConfig(), EncodeConfig(bos=True, eos=True, special=True), DecodeConfig(skip_special=True),
    InspectConfig(top=3, invalid_utf8="replace"),
])
def test_configs_round_trip(config):
    assert_round_trips(config)


def test_config_ranges():
    with pytest.raises(ConfigError, match="character_coverage must be in"):
        TokenizerConfig(character_coverage=0.0)
    with pytest.raises(ConfigError, match="heldout_fraction must be in"):
        TokenizerConfig(heldout_fraction=0.6)
    with pytest.raises(ConfigError, match="max_lines"):
        TokenizerConfig(max_lines=-1)
    with pytest.raises(ConfigError, match="top"):
        InspectConfig(top=-1)


def test_train_takes_a_config_or_its_fields(corpus):
    config = TokenizerConfig(vocab_size=400, seed=3, max_lines=2000)
    assert train([corpus], config=config).model_bytes == train([corpus], 400, seed=3, max_lines=2000).model_bytes
    with pytest.raises(TypeError, match="not both"):
        train([corpus], 400, config=config)


def test_train_reports_progress_stage_by_stage(tmp_path, monkeypatch):
    from tokenizer import trainer

    monkeypatch.setattr(trainer, "REPORT_BYTES", 100_000)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    files = [write(tmp_path / "a.txt", text[:700_000]), write(tmp_path / "b.txt", text[700_000:900_000])]
    size = sum(f.stat().st_size for f in files)
    events = []
    tok = train(files, 400, progress=collect(events))
    r = tok.report
    stages = {"reading": ("bytes", size), "training": ("lines", r["training_lines"]),
              "measuring": ("lines", r["heldout_lines"])}
    assert list(dict.fromkeys(e.stage for e in events)) == list(stages)
    for stage, (unit, total) in stages.items():
        seen = [e for e in events if e.stage == stage]
        assert {(e.unit, e.total) for e in seen} == {(unit, total)}
        done = [e.done for e in seen]
        assert done == sorted(done) and done[-1] == total and done[0] < total
    reading = [e.done for e in events if e.stage == "reading"]
    assert files[0].stat().st_size in reading  # the end of the first file is reported
    assert len(reading) >= 7  # and progress within a file, every REPORT_BYTES


def test_encode_decode_and_inspect_calls(tok_dir, tok, corpus):
    text = "<|user|>Speak, speak.\n"
    encoded = encode_text(tok_dir, text, EncodeConfig(bos=True, special=True))
    assert encoded["ids"] == tok.encode(text, bos=True, allow_special=True) and encoded["chars"] == len(text)
    assert encoded["pieces"] == [tok.id_to_piece(i) for i in encoded["ids"]]
    assert encoded["tokens"] == len(encoded["ids"])
    assert encode_text(tok_dir, text)["ids"] == tok.encode(text)
    assert decode_ids(tok_dir, encoded["ids"]) == {"text": text, "tokens": len(encoded["ids"]), "chars": len(text)}
    assert decode_ids(tok_dir, encoded["ids"], DecodeConfig(skip_special=True))["text"] == "Speak, speak.\n"
    info = inspect_tokenizer(tok_dir, corpus, InspectConfig(top=3))
    assert info["longest_pieces"] == tok.longest_pieces(3) and info["vocab_size"] == VOCAB
    assert info["pieces"] == {"special": 6, "byte": 256, "line break": 2, "learned": VOCAB - 264}
    body = corpus.read_text(encoding="utf-8")
    assert info["text"]["round_trip"] is True and info["text"]["tokens"] == len(tok.encode(body))
    assert info["training"] == tok.report and info["tokenizer_sha256"] == file_hash(tok_dir)
    assert "text" not in inspect_tokenizer(tok_dir)


# --- CLI -----------------------------------------------------------------------------------




def test_cli_train_encode_decode_inspect(corpus, tmp_path, cli):
    out = tmp_path / "tok"
    code, stdout, err = cli("tokenizer", "train", corpus, "--vocab-size", 500, "--out", out,
                            "--special-tokens", "<|user|>,<|tool|>", "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["vocab_size"] == 500 and result["tokenizer_sha256"] == file_hash(out)
    assert result["special_tokens"]["<|tool|>"] == 5

    text = "  Speak, speak.\r\n\tFirst Citizen:  \u2581 😀\n"
    code, stdout, _ = cli("tokenizer", "encode", out, "-", "--json", stdin=text.encode())
    assert code == 0
    encoded = json.loads(stdout.strip().splitlines()[-1])
    assert encoded["ids"] == Tokenizer.load(out).encode(text)

    code, stdout, _ = cli("tokenizer", "encode", out, text)
    ids = [int(i) for i in stdout.split()]
    assert ids == encoded["ids"]

    code, stdout, _ = cli("tokenizer", "decode", out, ",".join(map(str, ids)))
    assert code == 0 and stdout == text
    code, stdout, _ = cli("tokenizer", "decode", out, "-", stdin=json.dumps(encoded).encode())
    assert code == 0 and stdout == text

    code, stdout, _ = cli("tokenizer", "encode", out, "<|user|>hi", "--special", "--bos", "--pieces")
    assert stdout.split()[:2] == ["<bos>", "<|user|>"]

    code, stdout, _ = cli("tokenizer", "inspect", out, "--text", corpus, "--json")
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["text"]["round_trip"] is True
    assert info["pieces"] == {"special": 6, "byte": 256, "line break": 2, "learned": 500 - 264}
    assert info["training"]["vocab_size"] == 500
    code, stdout, _ = cli("tokenizer", "inspect", out)
    assert code == 0 and "longest pieces" in stdout and file_hash(out)[:16] in stdout


def cli_bad_cases(tmp: Path, tok_dir: Path):
    files = bad_inputs(tmp)
    cases = {}
    for name, (paths, options, message) in files.items():
        argv = ["tokenizer", "train", *paths, "--vocab-size", options.get("vocab_size", 400), "--out", tmp / "out"]
        if "character_coverage" in options:
            argv += ["--character-coverage", options["character_coverage"]]
        for token in options.get("special_tokens", []):
            argv += ["--special-tokens", token]
        cases[f"train: {name}"] = (argv, message)
    existing = tmp / "existing"
    existing.mkdir(exist_ok=True)
    good = tmp / "good.txt"
    cases["train: output exists"] = (["tokenizer", "train", good, "--vocab-size", 400, "--out", existing],
                                     "already exists")
    fake = write(tmp / "fake" / "tokenizer.model", "hello\n")
    cases["encode: not a sentencepiece model"] = (["tokenizer", "encode", fake.parent, "hi"],
                                                  "not a sentencepiece model")
    cases["decode: not a sentencepiece model"] = (["tokenizer", "decode", fake, "1 2"], "not a sentencepiece model")
    cases["decode: id out of range"] = (["tokenizer", "decode", tok_dir, "1 99999"], "out of range")
    cases["decode: not an integer"] = (["tokenizer", "decode", tok_dir, "1 two"], "not an integer")
    model = (tok_dir / "tokenizer.model").read_bytes()
    cut = write(tmp / "cut" / "tokenizer.model", model[:len(model) // 2])
    cases["encode: tokenizer.model cut short"] = (
        ["tokenizer", "encode", cut.parent, "hi"], f"{cut} is not a sentencepiece model (it does not parse")
    damaged, id = with_piece_not_utf8(tok_dir)
    damaged = write(tmp / "damaged" / "tokenizer.model", damaged)
    cases["encode: tokenizer.model with a piece not UTF-8"] = (
        ["tokenizer", "encode", damaged.parent, "hi"], f"{damaged} is not a usable sentencepiece model: piece {id} ")
    cases["decode: JSON cut short"] = (["tokenizer", "decode", tok_dir, "[1, 2"],
                                       "IDS is not valid JSON (column 6: Expecting ',' delimiter)")
    cases["decode: JSON on stdin broken at line 2"] = (["tokenizer", "decode", tok_dir, "-"],
                                                       "IDS is not valid JSON (line 2, column 4: Expecting value)")
    cases["decode: JSON ids a string"] = (["tokenizer", "decode", tok_dir, '{"ids": "12"}'],
                                          "IDS is JSON but not a list of token ids")
    cases["decode: JSON id a float"] = (["tokenizer", "decode", tok_dir, '{"ids": [5, 1.5]}'],
                                        "token id 1.5 (item 2 of IDS) is not an integer")
    cases["decode: JSON id a boolean"] = (["tokenizer", "decode", tok_dir, "[true]"],
                                          "token id true (item 1 of IDS) is not an integer")
    cases["decode: JSON nested list"] = (["tokenizer", "decode", tok_dir, "[[5, 6]]"],
                                         "token id [5, 6] (item 1 of IDS) is not an integer")
    cases["decode: a digit that is not ASCII"] = (["tokenizer", "decode", tok_dir, "5 \u00b2"],
                                                  "token id '\u00b2' is not an integer")
    cases["inspect: missing tokenizer"] = (["tokenizer", "inspect", tmp / "nope"], "not found")
    cases["inspect: --text invalid UTF-8"] = (["tokenizer", "inspect", tok_dir, "--text", tmp / "latin1.txt"],
                                              "offset 9")
    return cases


CLI_BAD_CASES = [f"train: {name}" for name in BAD_CASES] + [
    "train: output exists", "encode: not a sentencepiece model", "decode: not a sentencepiece model",
    "decode: id out of range", "decode: not an integer", "inspect: missing tokenizer", "inspect: --text invalid UTF-8",
    "encode: tokenizer.model cut short", "encode: tokenizer.model with a piece not UTF-8", "decode: JSON cut short",
    "decode: JSON on stdin broken at line 2", "decode: JSON ids a string", "decode: JSON id a float",
    "decode: JSON id a boolean", "decode: JSON nested list", "decode: a digit that is not ASCII"]


@pytest.mark.parametrize("case", CLI_BAD_CASES)
def test_cli_bad_input_exit_2_one_line(case, tmp_path, tok_dir, cli):
    argv, message = cli_bad_cases(tmp_path, tok_dir)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = cli(*argv, stdin="[5,\n 6,,\n" if argv[-1] == "-" else None)
    assert code == 2, (stdout, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("lbdl: error:") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not (tmp_path / "out").exists()


def test_cli_train_force_replaces(corpus, tmp_path, cli):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")  # --force replaces the directory, not just adds to it
    code, _, err = cli("tokenizer", "train", corpus, "--vocab-size", 400, "--out", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary or old sibling left


# --- the benchmark script (smoke test on a tiny corpus) -------------------------------------


def test_benchmark_smoke(tmp_path):
    pytest.importorskip("tokenizers")
    spec = importlib.util.spec_from_file_location("bench_tokenizer", ROOT / "benchmarks" / "bench_tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    corpus = write(tmp_path / "c.txt", SHAKESPEARE.read_text(encoding="utf-8")[:60_000])
    rows = bench.run_corpus("tiny", corpus, vocab_size=400, runs=1, workdir=tmp_path)
    assert [r["tokenizer"] for r in rows] == ["lbdl (sentencepiece BPE)", "HF tokenizers byte-level BPE"]
    for r in rows:
        assert r["round_trip"] is True
        assert 1.0 < r["chars_per_token"] < 6 and r["bytes_per_token"] >= r["chars_per_token"]  # UTF-8: bytes >= chars
    table = bench.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "tiny" in table
