"""Sampling and `lbdl generate`: known answers, invariants, parity with transformers, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import SEP, imported_hf_model, tiny_model

from lbdl_cli import kernels
from lbdl_cli.checkpoint import save_model
from lbdl_cli.errors import CheckpointError, ConfigError
from lbdl_cli.sample import (
    SamplingConfig,
    TextStream,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    load_for_inference,
    next_tokens,
)

# --- fixtures and helpers ------------------------------------------------------------------


class ScriptedLM(nn.Module):
    """A stand-in for GPT whose every continuation is `script`, token by token.

    The logits at absolute position p put all their mass on script[p + 1 - prompt_len]
    (the last entry repeats), whatever the tokens: known text, EOS and stops on demand.
    """

    def __init__(self, script, prompt_len, vocab=400, block_size=256):
        super().__init__()
        from lbdl_cli.model import ModelConfig

        self.config = ModelConfig(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.tok_emb = nn.Embedding(vocab, 8)
        self.script, self.prompt_len = list(script), prompt_len

    @property
    def device(self):
        return self.tok_emb.weight.device

    def new_cache(self, batch_size, max_len=None):
        return type("Cache", (), {"length": 0})()

    def forward(self, idx, cache=None, logits_to_keep=0):
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.length += T
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        for t in range(T):
            k = min(max(start + t + 1 - self.prompt_len, 0), len(self.script) - 1)
            logits[:, t, self.script[k]] = 10.0
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def greedy(**kw):
    return SamplingConfig(temperature=0.0, **kw)


@torch.no_grad()
def stepwise_argmax(model, prompt, n, keep=None):
    """Greedy continuation recomputed with a full forward pass per token, no cache, with
    the same sliding-window policy as generate (the newest `keep` positions when the
    context would pass block_size)."""
    block = model.config.block_size
    keep = keep or block // 2
    ids = list(prompt)
    start = max(0, len(ids) - block)
    for _ in range(n):
        if len(ids) - start > block:
            start = len(ids) - keep
        logits = model(torch.tensor([ids[start:]]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


# --- logits processors: known answers --------------------------------------------------------


def test_repetition_penalty_known_answer():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    apply_repetition_penalty(logits, seen, 2.0)
    assert logits.tolist() == [[1.0, -2.0, 0.5, 3.0, -8.0]]


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    history = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits.clone(), seen, 1.3), expected, rtol=0, atol=0)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(apply_top_k(torch.zeros(1, 4), 0)).all()  # 0 = off


def test_top_p_known_answer_and_transformers_oracle():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])

    def kept(p):
        return torch.isfinite(apply_top_p(probs.log(), p)).tolist()[0]

    assert kept(0.75) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.75
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    for p in (0.3, 0.6, 0.9):
        logits = torch.randn(4, 64) * 2
        ours = torch.isfinite(apply_top_p(logits.clone(), p))
        theirs = torch.isfinite(transformers.TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(ours, theirs)


def test_min_p_keeps_exactly_the_tokens_above_min_p_times_the_top():
    torch.manual_seed(2)
    logits = torch.randn(5, 100) * 2
    probs = logits.softmax(-1)
    for min_p in (0.05, 0.2, 0.5):
        kept = torch.isfinite(apply_min_p(logits.clone(), min_p))
        assert torch.equal(kept, probs >= min_p * probs.max(-1, keepdim=True).values)


def test_sampling_draws_from_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).repeat(40_000, 1)
    g = torch.Generator().manual_seed(0)
    picks = next_tokens(logits.clone(), SamplingConfig(temperature=1.0), generator=g)
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    hot = next_tokens(logits.clone(), SamplingConfig(temperature=0.5), generator=g)  # sharper
    freq = torch.bincount(hot, minlength=4).float() / len(hot)
    torch.testing.assert_close(freq, (logits[0] / 0.5).softmax(-1), atol=0.01, rtol=0)


@pytest.mark.parametrize("bad, fragment", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=("",)), "stop"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_sampling_config_rejects_bad_values(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SamplingConfig(**bad)


def test_sampling_config_is_frozen_and_takes_a_single_stop_string():
    config = SamplingConfig(stop="\n")
    assert config.stop == ("\n",)
    with pytest.raises(Exception):
        config.temperature = 1.0


# --- generate: known answers and invariants ------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_stepwise_argmax_without_cache(family):
    model = tiny_model(family=family)
    prompt = [5, 17, 3, 42, 8]
    [out] = generate(model, None, [prompt], greedy(max_new_tokens=20))
    assert out.token_ids == stepwise_argmax(model, prompt, 20)
    assert out.finish_reason == "length" and out.prompt_tokens == 5 and out.decode_steps == 19


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sliding_window_past_block_size_matches_the_reference_and_says_so_once(family):
    model = tiny_model(family=family)  # block_size 32
    notices = []
    for prompt in ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], list(range(40, 80))):  # short, and longer than the context
        notices.clear()
        [out] = generate(model, None, [prompt], greedy(max_new_tokens=50), on_notice=notices.append)
        assert out.token_ids == stepwise_argmax(model, prompt, 50)
        assert len(notices) == 1 and "context of 32 tokens" in notices[0]
        assert out.window_slides >= 2
    notices.clear()
    generate(model, None, [[1, 2, 3]], greedy(max_new_tokens=10), on_notice=notices.append)
    assert notices == []  # fits: nothing said


def test_top_k_1_top_p_tiny_and_min_p_1_equal_greedy():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5]
    [ref] = generate(model, None, [prompt], greedy(max_new_tokens=12))
    for config in (SamplingConfig(temperature=1.5, top_k=1, max_new_tokens=12, seed=1),
                   SamplingConfig(temperature=1.5, top_p=1e-6, max_new_tokens=12, seed=2),
                   SamplingConfig(temperature=1.5, min_p=1.0, max_new_tokens=12, seed=3)):
        [out] = generate(model, None, [prompt], config)
        assert out.token_ids == ref.token_ids


def test_a_seed_gives_reproducible_samples():
    model = tiny_model()
    config = SamplingConfig(temperature=2.0, max_new_tokens=16, seed=7)
    a = generate(model, None, [[1, 2, 3]], config, num_samples=3)
    b = generate(model, None, [[1, 2, 3]], config, num_samples=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert len({tuple(g.token_ids) for g in a}) > 1  # the samples differ from one another
    c = generate(model, None, [[1, 2, 3]], SamplingConfig(temperature=2.0, max_new_tokens=16, seed=8), num_samples=3)
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_prompts_equal_unbatched_greedy(family):
    model = tiny_model(family=family)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [8, 9, 10], [1]]  # two share a length: one batch
    config = greedy(max_new_tokens=15, repetition_penalty=1.3)
    batched = generate(model, None, prompts, config, num_samples=2)
    assert [(g.prompt_index, g.sample_index) for g in batched] == [(p, s) for p in range(4) for s in range(2)]
    assert batched[0].batch_size == 4  # prompts 0 and 2, two samples each
    for g in batched:
        [alone] = generate(model, None, [prompts[g.prompt_index]], config)
        assert g.token_ids == alone.token_ids


def test_repetition_penalty_changes_greedy_output_as_computed_by_hand():
    model = tiny_model()
    prompt = [7, 7, 7, 7]
    [out] = generate(model, None, [prompt], greedy(max_new_tokens=6, repetition_penalty=5.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([ids]))[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[ids] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / 5.0, logits * 5.0), logits)
            ids.append(int(logits.argmax()))
    assert out.token_ids == ids[4:]


def test_eos_ends_the_text_unless_ignored(tok):
    script = tok.encode("Hello there") + [tok.eos_id] + tok.encode(" more")
    prompt = tok.encode("Say:")
    model = ScriptedLM(script, len(prompt))
    [out] = generate(model, tok, "Say:", greedy(max_new_tokens=40))
    assert out.text == "Hello there" and out.finish_reason == "eos" and out.token_ids[-1] == tok.eos_id
    [out] = generate(model, tok, "Say:", greedy(max_new_tokens=12, ignore_eos=True))
    assert out.finish_reason == "length" and out.new_tokens == 12 and out.text.startswith("Hello there more")


@pytest.mark.parametrize("stop, expected", [
    ("\n", "Hello there."), ("re.\nSec", "Hello the"), ("Hello", ""), ("absent", "Hello there.\nSecond line"),
])
def test_stop_strings_cut_the_text_and_never_stream_part_of_a_stop(tok, stop, expected):
    script = tok.encode("Hello there.\nSecond line") + [tok.eos_id]
    prompt = tok.encode("Q")
    model = ScriptedLM(script, len(prompt))
    streamed = []
    [out] = generate(model, tok, "Q", greedy(max_new_tokens=60, stop=(stop, "zzz")),
                     on_token=lambda i, t: streamed.append(t))
    assert out.text == expected
    assert "".join(streamed) == expected
    assert out.finish_reason == ("eos" if stop == "absent" else "stop")


def test_streamed_text_equals_the_decoded_tokens_with_multibyte_characters(tok):
    text = "héllo wörld 🙂, naïve — ünïcödé!"
    script = tok.encode(text) + [tok.eos_id]
    model = ScriptedLM(script, len(tok.encode("A")))
    streamed = []
    [out] = generate(model, tok, "A", greedy(max_new_tokens=100), on_token=lambda i, t: streamed.append(t))
    assert out.text == text == "".join(streamed)
    assert all("\ufffd" not in s for s in streamed)
    [quiet] = generate(model, tok, "A", greedy(max_new_tokens=100))  # no streaming: decoded once at the end
    assert quiet.text == text


def test_text_stream_keeps_a_leading_space(tok):
    stream = TextStream(tok, tok.encode("To be"))
    text = "".join(stream.push(i) for i in tok.encode(" or not to be"))
    assert text + stream.flush() == " or not to be"


def test_prompts_that_are_empty_or_only_special_tokens_are_refused(tok, model_dir):
    model, tok_, _ = load_for_inference(model_dir)
    with pytest.raises(ConfigError, match="empty"):
        generate(model, tok_, "", greedy())
    with pytest.raises(ConfigError, match="only special tokens"):
        generate(model, tok_, SEP + SEP, greedy())
    with pytest.raises(ConfigError, match="prompt 2 is empty"):
        generate(model, tok_, ["fine", ""], greedy())


def test_load_for_inference_needs_a_tokenizer(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        load_for_inference(tmp_path / "m")


def test_bfloat16_generation_matches_its_own_stepwise_argmax():
    model = tiny_model(family="llama").to(torch.bfloat16)
    prompt = [4, 8, 15, 16, 23]
    [out] = generate(model, None, [prompt], greedy(max_new_tokens=8))
    assert len(out.token_ids) == 8
    with torch.no_grad():  # the first token comes from the prefill: same as a full forward
        assert out.token_ids[0] == int(model(torch.tensor([prompt]))[0, -1].float().argmax())


def test_fused_qkv_follows_in_place_weight_changes():
    model = tiny_model(family="llama")
    prompt = [4, 8, 15, 16, 23]
    generate(model, None, [prompt], greedy(max_new_tokens=4))  # builds the fused q/k/v matrices
    with torch.no_grad():
        for block in model.blocks:
            block.attn.k_proj.weight.mul_(-3.0)  # an in-place update, as an optimizer step or a merge
    [out] = generate(model, None, [prompt], greedy(max_new_tokens=12))
    assert out.token_ids == stepwise_argmax(model, prompt, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_with_the_inference_layout_equals_the_full_forward(dtype):
    """Laid out for the decoding kernels (split_gemv and oneDNN in float32; gemv_without_onednn in bfloat16), a model's
    one-token steps through the KV cache give the logits of the unlaid model's full forward (bfloat16 to its
    precision), and greedy float32 decoding gives the tokens of a full forward per token."""
    from lbdl_cli.model import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=4, n_embd=512)).eval().to(dtype)
    x = torch.randint(0, 97, (1, 12))
    prompt = [4, 8, 15, 16, 23]
    with torch.no_grad():
        full = model(x).float()
    expected = stepwise_argmax(model, prompt, 6)
    kernels.inference_layout(model.matrices())
    cache = model.new_cache(1)
    with torch.inference_mode():
        steps = torch.cat([model(x[:, i:i + 1], cache=cache) for i in range(12)], dim=1).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(steps, full, rtol=tol, atol=tol * full.abs().max().item())
    if dtype == torch.float32:
        [out] = generate(model, None, [prompt], greedy(max_new_tokens=6))
        assert out.token_ids == expected


def test_decoding_leaves_the_onednn_switch_as_the_caller_set_it():
    """bfloat16 decoding turns oneDNN off for single products only (kernels.gemv_without_onednn): on, it is on
    after a generation whose window slid; off (the caller's choice), it stays off."""
    model = tiny_model().to(torch.bfloat16)
    [on] = generate(model, None, [[1, 2, 3]], greedy(max_new_tokens=40))  # slides (block 32) inside the loop
    assert torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        [off] = generate(model, None, [[1, 2, 3]], greedy(max_new_tokens=40))
        assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True
    assert len(on.token_ids) == len(off.token_ids) == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_equals_cpu_greedy_first_tokens(dtype):
    cpu = tiny_model(family="llama")
    gpu = tiny_model(family="llama").to("cuda", dtype)
    gpu.reset_rope(device="cuda")
    prompt = [4, 8, 15, 16, 23]
    [a] = generate(gpu, None, [prompt], greedy(max_new_tokens=40))
    assert len(a.token_ids) == 40
    if dtype == torch.float32:
        [b] = generate(cpu, None, [prompt], greedy(max_new_tokens=40))
        assert a.token_ids[:10] == b.token_ids[:10]
    [s] = generate(gpu, None, [prompt], SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, seed=0, max_new_tokens=40))
    assert len(s.token_ids) == 40


# --- parity with transformers' generate -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_tokens_equal_transformers_generate(arch, tmp_path):
    hf, model = imported_hf_model(arch, tmp_path, noise=0.2)
    kernels.inference_layout(model.matrices())  # as load_for_inference (the CLI) lays it out
    prompt = [5, 17, 3, 42, 8, 99]
    [ours] = generate(model, None, [prompt], greedy(max_new_tokens=30))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours.token_ids == theirs


# --- the command line --------------------------------------------------------------------------------


def test_generate_command_streams_the_prompt_and_continuation(cli, model_dir, tok):
    r = cli("generate", model_dir, "To be, or not", "-t", "0", "-n", "12")
    assert r.code == 0, r.err
    model, tok_, _ = load_for_inference(model_dir)
    [expected] = generate(model, tok_, "To be, or not", greedy(max_new_tokens=12))
    assert r.out == "To be, or not" + expected.text + "\n"
    assert "decode" in r.err and "tok/s" in r.err


def test_generate_command_in_bfloat16(cli, model_dir):
    r = cli("generate", model_dir, "To be", "-t", "0", "-n", "6", "--compute-dtype", "bfloat16", "--json")
    assert r.code == 0, r.err
    assert r.json()["dtype"] == "bfloat16" and r.json()["new_tokens"] == 6


def test_generate_command_json(cli, model_dir):
    r = cli("generate", model_dir, "To be", "--temperature", "0.9", "--top-k", "50", "--seed", "3", "-n", "9",
            "--num-samples", "2", "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert len(result["results"]) == 2 and result["new_tokens"] == 18
    for g in result["results"]:
        assert g["new_tokens"] == 9 and g["decode_steps"] == 8 and g["finish_reason"] == "length"
        assert g["batch_size"] == 2 and isinstance(g["text"], str)
        assert g["prefill_tokens_per_s"] == pytest.approx(g["prompt_tokens"] / g["prefill_s"])
        assert g["decode_tokens_per_s"] == pytest.approx(8 / g["decode_s"])
    # the totals count the batch once: its prompt twice (two rows), its steps twice
    g = result["results"][0]
    assert result["prompt_tokens"] == 2 * g["prompt_tokens"] and result["decode_s"] == g["decode_s"]
    assert result["decode_tokens_per_s"] == pytest.approx(16 / g["decode_s"])
    assert result["sampling"]["top_k"] == 50 and result["sampling"]["seed"] == 3
    again = cli("generate", model_dir, "To be", "--temperature", "0.9", "--top-k", "50", "--seed", "3", "-n", "9",
                "--num-samples", "2", "--json").json()
    assert [g["token_ids"] for g in again["results"]] == [g["token_ids"] for g in result["results"]]


def test_generate_prompt_from_stdin_file_and_each_line(cli, model_dir, tmp_path, monkeypatch):
    import io

    direct = cli("generate", model_dir, "Hello", "-t", "0", "-n", "5", "--json").json()["results"][0]["text"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello"))
    assert cli("generate", model_dir, "-", "-t", "0", "-n", "5", "--json").json()["results"][0]["text"] == direct
    (tmp_path / "p.txt").write_text("Hello\n\nGood night\n")
    r = cli("generate", model_dir, "--prompt-file", tmp_path / "p.txt", "--each-line", "-t", "0", "-n", "5", "--json")
    results = r.json()["results"]
    assert [g["prompt"] for g in results] == ["Hello", "Good night"] and results[0]["text"] == direct


def test_generate_without_a_model_uses_the_bundled_default(cli, model_dir, monkeypatch):
    import lbdl_cli.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "default_model_dir", lambda: model_dir)
    a = cli("generate", "Hello", "-t", "0", "-n", "5", "--json")
    b = cli("generate", model_dir, "Hello", "-t", "0", "-n", "5", "--json")
    assert a.code == 0 and a.json()["results"][0]["text"] == b.json()["results"][0]["text"]
    assert a.json()["model"] == "default"


def test_sliding_window_note_is_printed_once(cli, model_dir):
    r = cli("generate", model_dir, "To be, or not to be", "-t", "0", "-n", "150")
    assert r.code == 0
    assert r.err.count("sliding the window") == 1


def _no_model(tmp_path):
    save_model(tiny_model(vocab_size=400), tmp_path / "no-tok")
    return tmp_path / "no-tok"


@pytest.mark.parametrize("case", [
    "missing-model", "default-missing", "empty-prompt", "special-only", "negative-temperature", "top-p-zero",
    "top-p-above-one", "negative-top-k", "no-tokenizer", "no-prompt", "missing-prompt-file",
])
def test_generate_bad_input_is_one_line_exit_2(case, cli, model_dir, tmp_path, monkeypatch):
    import lbdl_cli.checkpoint as checkpoint

    if case == "default-missing":  # the bundled model's absence, as default_model_dir reports it
        def missing():
            raise CheckpointError("the bundled default model is missing from models/default; reinstall lbdl or "
                                  "name a model directory")
        monkeypatch.setattr(checkpoint, "default_model_dir", missing)
    args = {
        "missing-model": [tmp_path / "nope", "Hi"],
        "default-missing": ["Hi"],
        "empty-prompt": [model_dir, ""],
        "special-only": [model_dir, SEP],
        "negative-temperature": [model_dir, "Hi", "--temperature", "-1"],
        "top-p-zero": [model_dir, "Hi", "--top-p", "0"],
        "top-p-above-one": [model_dir, "Hi", "--top-p", "1.5"],
        "negative-top-k": [model_dir, "Hi", "--top-k", "-2"],
        "no-tokenizer": [_no_model(tmp_path) if case == "no-tokenizer" else None, "Hi"],
        "no-prompt": [model_dir],
        "missing-prompt-file": [model_dir, "--prompt-file", tmp_path / "absent.txt"],
    }[case]
    r = cli("generate", *args)
    assert r.code == 2, (r.out, r.err)
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbdl: error:"), r.err
    expected = {"missing-model": "does not exist", "default-missing": "bundled default model", "empty-prompt": "empty",
                "special-only": "only special tokens", "negative-temperature": "temperature",
                "top-p-zero": "top_p", "top-p-above-one": "top_p", "negative-top-k": "top_k",
                "no-tokenizer": "tokenizer.model", "no-prompt": "no prompt",
                "missing-prompt-file": "does not exist"}[case]
    assert expected in lines[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_samples_share_their_prompt_s_prefill(family, monkeypatch):
    """num_samples=K prefills each prompt once (K rows of cache copied from it): the same chains, draw for
    draw, as K copies of the prompt given as K prompts (each prefilled), and one forward over 2 rows, not 6."""
    model = tiny_model(family=family)
    config = SamplingConfig(temperature=1.5, max_new_tokens=12, seed=3)
    shared = generate(model, None, [[5, 6, 7], [8, 9, 10]], config, num_samples=3)
    copies = generate(model, None, [[5, 6, 7]] * 3 + [[8, 9, 10]] * 3, config)
    assert [g.token_ids for g in shared] == [g.token_ids for g in copies]
    assert len({tuple(g.token_ids) for g in shared[:3]}) > 1  # the chains differ
    rows = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, idx, *a, **k: rows.append(idx.shape) or real(
        self, idx, *a, **k))
    generate(model, None, [[5, 6, 7], [8, 9, 10]], config, num_samples=3)
    assert rows[0] == (2, 3) and all(r[0] == 6 for r in rows[1:])  # the prefill, then 6 rows a step
