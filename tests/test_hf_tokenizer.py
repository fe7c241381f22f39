"""tokenizer/hf.py: the Hugging Face tokenizer.json of an lbdl tokenizer encodes and decodes as lbdl does,
with transformers' AutoTokenizer (and the tokenizers library) as the oracle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import ATOMS, EXTRA_TEXT, KNOWN

from lbdl_cli.errors import DataError
from tokenizer import Tokenizer, train
from tokenizer.hf import save_hf_tokenizer, tokenizer_json

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ("<|user|>", "<|assistant|>")
BASE_NAMES = ("<unk>", "<bos>", "<eos>", "<pad>")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """Shakespeare with code, accents, CJK and emoji (so that some multi-byte characters are pieces and others
    fall back to bytes), and two user special tokens."""
    root = tmp_path_factory.mktemp("hftok")
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000] + "\n" + EXTRA_TEXT * 20
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    return train([root / "corpus.txt"], 600, out=root / "tok", special_tokens=SPECIALS, seed=7)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    assert save_hf_tokenizer(tok, out, model_max_length=256) == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    """transformers' tokenizer: special-token text is read as the token (lbdl's allow_special=True)."""
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def hf_text(hf_dir):
    """The same with split_special_tokens=True: special-token text stays text (lbdl's default)."""
    return transformers.AutoTokenizer.from_pretrained(hf_dir, split_special_tokens=True)


def assert_same(tok, hf, hf_text, text):
    plain = tok.encode(text)
    assert hf_text.encode(text) == plain
    assert hf_text.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    if not any(name in text for name in BASE_NAMES):  # transformers reads these names as their tokens
        assert hf.encode(text) == special
    assert hf.decode(special) == text


@pytest.mark.parametrize("text", KNOWN, ids=range(len(KNOWN)))
def test_same_ids_and_text_as_lbdl_on_the_round_trip_strings(tok, hf, hf_text, text):
    assert_same(tok, hf, hf_text, text)


def test_same_ids_on_a_paragraph_of_unseen_text(tok, hf, hf_text):
    text = (ROOT / "data" / "tinyshakespeare-val.txt").read_text(encoding="utf-8")[:3000]
    ids = tok.encode(text)
    assert hf.encode(text) == ids and hf_text.encode(text) == ids
    assert hf.decode(ids) == text
    assert len(ids) < len(text) / 2  # learned merges at work, not characters or bytes


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_same_ids_on_any_text(tok, hf, hf_text, text):
    assert_same(tok, hf, hf_text, text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ATOMS + list(SPECIALS) + ["\u2581\u2581", "<0x41>"]), max_size=40).map("".join))
def test_same_ids_on_whitespace_markers_and_special_tokens(tok, hf, hf_text, text):
    assert_same(tok, hf, hf_text, text)


def test_user_special_tokens_are_added_special_tokens(tok, hf, hf_text):
    user, assistant = (tok.special_tokens[s] for s in SPECIALS)
    text = "<|user|>Who art thou?<|assistant|>A citizen."
    ids = hf.encode(text)
    assert ids == tok.encode(text, allow_special=True)
    assert ids[0] == user and ids.count(assistant) == 1
    assert hf.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True) == "Who art thou?A citizen."
    assert hf_text.encode(text) == tok.encode(text) and user not in hf_text.encode(text)
    assert set(SPECIALS) <= set(hf.all_special_tokens)


def test_bos_eos_pad_and_settings(tok, hf, hf_dir):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    assert hf.model_max_length == 256
    assert hf.encode("To be") == tok.encode("To be")  # no <bos> added: lbdl adds one only when asked
    ids = tok.encode("To be", bos=True, eos=True)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == "To be"
    assert hf.decode(ids) == "<bos>To be<eos>"
    assert hf.encode("<eos>") == [tok.eos_id]  # the name of a special token is the token in transformers
    assert len(hf) == tok.vocab_size
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False
    assert json.loads((hf_dir / "special_tokens_map.json").read_text()) == {
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": list(SPECIALS)}


def test_tokenizers_library_reads_the_file_alone(tok, hf_dir):
    tokenizers = pytest.importorskip("tokenizers")
    fast = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    text = "First Citizen:\n  Speak,\tspeak.\r\n\u2581 日本語 😀 e\u0301"
    assert fast.encode(text).ids == tok.encode(text)
    assert fast.decode(tok.encode(text)) == text
    assert fast.get_vocab_size() == tok.vocab_size
    assert all(fast.id_to_token(i) == tok.id_to_piece(i).replace("\u2581", " ") for i in range(tok.vocab_size))


def test_a_tokenizer_with_other_settings_has_no_exact_form(tmp_path):
    lines = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000].splitlines()
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, model_type="bpe",
                                   vocab_size=300, minloglevel=2)  # dummy prefix, NFKC, no byte fallback
    foreign = Tokenizer(writer.getvalue())
    with pytest.raises(DataError, match="not trained with lbdl's settings"):
        tokenizer_json(foreign)
    with pytest.raises(DataError, match="not trained with lbdl's settings"):
        save_hf_tokenizer(foreign, tmp_path)
    assert not list(tmp_path.iterdir())
