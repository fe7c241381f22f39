"""`lbdl generate` as a library call: GenerateConfig (and SamplingConfig) round trips, stop strings as typed,
generate_text on a tiny model directory: known text, streaming, several prompts, bad prompts, the slide warning."""

from __future__ import annotations

import pytest
from conftest import SEP, assert_round_trips

from lbdl_cli.errors import ConfigError
from lbdl_cli.progress import collect
from lbdl_cli.sample import SamplingConfig, generate, load_for_inference
from lbdl_cli.sample.run import GenerateConfig, generate_text, split_prompts, stop_strings
from lbdl_cli.sample.text import unescape

# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    SamplingConfig(),
    SamplingConfig(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.3, max_new_tokens=7,
                   stop=("\n", "END"), seed=3, ignore_eos=True),
    GenerateConfig(),
    GenerateConfig(temperature=1.5, stop=("\\n",), seed=0, num_samples=3, each_line=True, compute_dtype="bfloat16",
                   device="cpu"),
])
def test_sampling_configs_round_trip(config):
    assert_round_trips(config)
    assert isinstance(config.to_dict()["stop"], list)  # the to_dict shape: stop strings as a list


def test_generate_config_checks_its_own_and_the_sampling_fields():
    with pytest.raises(ConfigError, match="num_samples"):
        GenerateConfig(num_samples=0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerateConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="dtype"):
        GenerateConfig(compute_dtype="int3")
    with pytest.raises(ConfigError, match="top_k must be an integer"):
        GenerateConfig(top_k=1.5)


def test_stop_strings_are_unescaped_once_in_the_sampling_view():
    assert unescape(r"a\nb\tc\rd\\n") == "a\nb\tc\rd\\n"  # \\ is one backslash, so \\n is not a line break
    assert stop_strings((r"\n", "END", "\n")) == ("\n", "END", "\n")
    cfg = GenerateConfig(stop=(r"\n\n", "Q:"), temperature=0.0, max_new_tokens=9, seed=4, num_samples=2)
    assert cfg.stop == (r"\n\n", "Q:")  # the config keeps what was typed, so it round-trips
    assert cfg.sampling == SamplingConfig(stop=("\n\n", "Q:"), temperature=0.0, max_new_tokens=9, seed=4)
    assert type(cfg.sampling) is SamplingConfig


def test_split_prompts():
    assert split_prompts("a\n\n b\n", each_line=False) == ["a\n\n b\n"]
    assert split_prompts("a\n\n b\n", each_line=True) == ["a", " b"]
    with pytest.raises(ConfigError, match="empty"):
        split_prompts("")
    with pytest.raises(ConfigError, match="no non-empty line"):
        split_prompts("\n \n", each_line=True)


# --- generate_text ----------------------------------------------------------------------------------


def greedy_texts(model_dir, prompts, **kw):
    model, tok_, _ = load_for_inference(model_dir)
    return [g.text for g in generate(model, tok_, prompts, SamplingConfig(temperature=0.0, **kw))]


def test_generate_text_streams_the_prompt_then_the_greedy_continuation(model_dir):
    streamed = []
    cfg = GenerateConfig(temperature=0.0, max_new_tokens=12)
    result = generate_text(model_dir, "To be, or not", cfg, on_text=streamed.append)
    [expected] = greedy_texts(model_dir, ["To be, or not"], max_new_tokens=12)
    [g] = result["results"]
    assert g["text"] == expected and g["new_tokens"] == 12 and g["finish_reason"] == "length"
    assert streamed[0] == "To be, or not" and "".join(streamed) == "To be, or not" + expected
    assert result["model"] == str(model_dir) and result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["sampling"] == cfg.sampling.to_dict() and result["num_samples"] == 1
    assert result["new_tokens"] == 12 and result["prompt_tokens"] == g["prompt_tokens"]


def test_generate_text_each_line_runs_every_line_and_streams_nothing(model_dir):
    streamed = []
    prompts = ["Hello", "Good night", "What light"]
    cfg = GenerateConfig(temperature=0.0, max_new_tokens=6, each_line=True, num_samples=2)
    result = generate_text(model_dir, "Hello\n\nGood night\n  \nWhat light\n", cfg, on_text=streamed.append)
    assert streamed == []
    assert [(g["prompt_index"], g["sample_index"]) for g in result["results"]] == [(p, s) for p in range(3)
                                                                                  for s in range(2)]
    assert [g["prompt"] for g in result["results"]] == [p for p in prompts for _ in range(2)]
    expected = greedy_texts(model_dir, prompts, max_new_tokens=6)
    assert [g["text"] for g in result["results"]] == [t for t in expected for _ in range(2)]


def test_generate_text_cuts_at_a_stop_string_typed_with_escapes(model_dir):
    [free] = greedy_texts(model_dir, ["First"], max_new_tokens=30)
    stop = free[8:11]
    typed = stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    result = generate_text(model_dir, "First", GenerateConfig(temperature=0.0, max_new_tokens=30, stop=(typed,)))
    [g] = result["results"]
    assert g["text"] == free[:free.index(stop)] and g["finish_reason"] == "stop" and g["stop"] == stop
    assert result["sampling"]["stop"] == [stop]


@pytest.mark.parametrize("prompt, each_line, message", [
    ("", False, "the prompt is empty"),
    (" \n\n", True, "no non-empty line"),
    (SEP, False, "only special tokens"),
    ("fine\n" + SEP, True, "prompt 2 holds only special tokens"),
])
def test_generate_text_refuses_a_bad_prompt_before_writing_anything(model_dir, prompt, each_line, message):
    streamed = []
    with pytest.raises(ConfigError, match=message):
        generate_text(model_dir, prompt, GenerateConfig(each_line=each_line, max_new_tokens=4),
                      on_text=streamed.append)
    assert streamed == []


def test_a_sliding_window_is_one_warning_event(model_dir):
    events = []
    result = generate_text(model_dir, "To be, or not to be", GenerateConfig(temperature=0.0, max_new_tokens=150),
                           progress=collect(events))
    assert result["window_slides"] >= 1
    assert [(e.stage, e.level) for e in events] == [("generate", "warning")]
    assert "sliding the window" in events[0].message
    quiet = []
    generate_text(model_dir, "To be", GenerateConfig(temperature=0.0, max_new_tokens=5), progress=collect(quiet))
    assert quiet == []  # it fits: nothing said


def test_a_lone_path_is_a_mistyped_model_not_a_prompt(cli, model_dir, tmp_path):
    """`lbdl generate runs/typo_model` must not run the bundled model on the text "runs/typo_model"."""
    (tmp_path / "notes.txt").write_text("a file, not a model")
    for arg in ("runs/typo_model", str(tmp_path / "notes.txt"), str(tmp_path)):
        r = cli("generate", arg, "-n", "2")
        assert r.code == 2 and f"{arg} looks like a path but is not a model directory" in r.err and not r.out
        assert "--model default" in r.err
    r = cli("generate", model_dir, "-n", "2")  # a model and no prompt
    assert r.code == 2 and "no prompt given for the model" in r.err
    r = cli("generate", "runs/nope", "To be", "-n", "2")  # MODEL PROMPT: the model is checked before torch
    assert r.code == 2 and r.err.strip() == "lbdl: error: model directory runs/nope does not exist"
    r = cli("generate", "--model", str(model_dir), "runs/typo_model", "-n", "3", "-t", "0", "--json")
    assert r.code == 0 and r.json()["results"][0]["prompt"] == "runs/typo_model"
    r = cli("generate", "--model", str(model_dir), "To be", "or not", "-n", "2")
    assert r.code == 2 and "expected PROMPT (the model is --model's) but got 2 arguments" in r.err


def test_generate_with_a_built_prompt_chains_and_a_vote(cli, model_dir, tmp_path):
    """--shots/--cot build the prompt (--show-prompt prints it), --self-consistency K samples K chains whose
    answers (--answer) are voted; the refusals of issue #15."""
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"input": "1+2", "output": "3", "cot": "one and two make 3"}\n'
                     '{"input": "2+3", "output": "5"}\n')
    common = ["-n", "6", "--compute-dtype", "float32", "--seed", "2"]
    r = cli("generate", model_dir, "Q: 3+4 A:", "--shots", shots, "--n-shots", "1", "--show-prompt", "-t", "0",
            *common)
    assert r.code == 0, r.err
    assert r.out.startswith("Q: ") and "Q: 3+4 A:" in r.out  # the prompt, then its continuation
    r = cli("generate", model_dir, "Q: 3+4 A:", "--shots", shots, "--n-shots", "2", "--self-consistency", "3",
            "-t", "1.0", "--answer", r"(\w)", *common, "--json")
    result = r.json()
    assert r.code == 0 and result["chains"] == 3 and len(result["results"]) == 3 and len(result["answers"]) == 3
    assert result["prompt"].endswith("Q: 3+4 A:") and result["shots_used"] + result["shots_dropped"] == 2
    votes = result["votes"]
    assert sum(votes.values()) == sum(a is not None for a in result["answers"])
    assert result["answer"] == (max(votes, key=votes.get) if votes else None)
    r = cli("generate", model_dir, "Q: 3+4 A:", "--self-consistency", "2", "-t", "1.0", "--answer-marker",
            "no such marker", *common, "--json")  # chains without the marker give no answer
    assert r.code == 0 and r.json()["answers"] == [None, None] and r.json()["answer"] is None
    for args, says in [(["--self-consistency", "3", "-t", "0"], "every chain would be the same"),
                       (["--answer", "(unclosed"], "(unclosed"),
                       (["--shots", shots, "--n-shots", "0"], "n_shots 0 with a shots file"),
                       (["--self-consistency", "0"], "self_consistency must be in [1, ")]:
        r = cli("generate", model_dir, "Q: 3+4 A:", *args, *common)
        assert r.code == 2 and says in r.err and r.err.count("\n") == 1, (args, r.err)
