"""`dam generate` end to end: the CLI on the tiny model folder, bad inputs, and SmolLM2 beyond L.

The CLI runs in-process through `dam_cli.cli.app.main` (the real entry point, with its error
mapping), so each case costs a model load, not a Python start.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import SHIPPED_PROFILE as SMOLLM2_PROFILE
from helpers import cpu_backend, run_cli


def assert_one_line_error(code: int, err: str, want_code: int, *needles: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == want_code, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


BASE = ["--device", "cpu", "--max-new-tokens", "6", "--ignore-eos"]


def test_streams_text_to_stdout_and_stats_to_stderr(tiny_model_dir, tiny_all_allowed_profile):
    code, out, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt",
                             "the cat is on the", *BASE)
    assert code == 0, err
    assert out.strip()
    for part in ("prompt 5 tokens", "first token", "tokens/s", "peak memory", "DAM density at 5 tokens 100.00%",
                 "attention dam"):
        assert part in err, err


def test_json_has_text_and_every_stat_and_matches_full_attention(tiny_model_dir, tiny_all_allowed_profile):
    args = ["--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt", "the dog and the cat", *BASE,
            "--json"]
    code, out, err = run_cli("generate", *args)
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_tokens"] == 5 and r["new_tokens"] == 6 and r["finish_reason"] == "length"
    assert r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
    assert r["density"] == pytest.approx(1.0) and r["attention"] == "dam" and r["device"] == "cpu"
    assert r["dynamic"] is None
    code, _, err = run_cli("generate", *args[:-1], "--attention", "full")  # nothing masked: the profile's, labelled
    assert code == 0 and "profile density at 5 tokens 100.00% (not used: --attention full)" in err, err
    assert "DAM density" not in err
    # The dynamic part's options are reported (the tail defaults to top-k), in JSON and in the stats line.
    code, outd, err = run_cli("generate", *args, "--dynamic-topk", "2", "--dynamic-block", "16")
    assert code == 0, err
    assert json.loads(outd)["dynamic"] == {"topk": 2, "block": 16, "tail_topk": 2, "score": "mean"}
    code, _, err = run_cli("generate", *args[:-1], "--dynamic-topk", "2", "--dynamic-block", "16",
                           "--dynamic-tail-topk", "5")
    assert code == 0, err
    assert "dynamic top-2 x 16, tail 5" in err and "density (static part)" in err
    code, outb, err = run_cli("generate", *args, "--dynamic-topk", "2", "--dynamic-block", "16",
                              "--dynamic-score", "bound")
    assert code == 0, err
    assert json.loads(outb)["dynamic"]["score"] == "bound"
    # The mass rule names its share and caps; without a share it is refused with the flag to give.
    mass = ["--dynamic-topk", "3", "--dynamic-block", "16", "--dynamic-score", "antidiag"]
    code, _, err = run_cli("generate", *args[:-1], *mass, "--dynamic-tail-mass", "0.8")
    assert code == 0, err
    assert "by attention mass 0.8 (antidiagonal estimate, at most 3; exact in the tail, at most 3)" in err
    code, _, err = run_cli("generate", *args, *mass)
    assert code != 0 and "--dynamic-score antidiag keeps blocks by attention mass: give --dynamic-tail-mass" in err
    code, _, err = run_cli("generate", *args[:-1], *mass[:-1], "antisum", "--dynamic-tail-mass", "0.8")
    assert code == 0, err
    assert "by attention mass 0.8 (summed-antidiagonal estimate, at most 3; exact in the tail, at most 3)" in err
    # The all-allowed profile (lengths < 2L) is full attention: greedy text must be identical.
    code, out2, err = run_cli("generate", *args, "--attention", "full")
    assert code == 0, err
    assert json.loads(out2)["text"] == r["text"]
    # Streaming prints the same text as --json reports.
    code, out3, _ = run_cli("generate", *args[:-1])
    assert out3.rstrip("\n") == r["text"]


def test_prompt_from_stdin_and_from_file_equal_prompt_option(tiny_model_dir, tiny_all_allowed_profile, tmp_path):
    common = ["--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, *BASE, "--json"]
    _, a, _ = run_cli("generate", *common, "--prompt", "what is the key")
    _, b, _ = run_cli("generate", *common, stdin="what is the key")
    f = tmp_path / "p.txt"
    f.write_text("what is the key", encoding="utf-8")
    _, c, _ = run_cli("generate", *common, "--prompt-file", str(f))
    assert json.loads(a)["text"] == json.loads(b)["text"] == json.loads(c)["text"]


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir, tiny_all_allowed_profile):
    common = ["--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt", "the tree", "--device",
              "cpu", "--max-new-tokens", "12", "--ignore-eos", "--json", "--temperature", "1.5", "--top-k", "40",
              "--top-p", "0.95"]
    texts = [json.loads(run_cli("generate", *common, "--seed", s)[1])["text"] for s in ("1", "1", "2")]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]  # 12 tokens from a near-uniform random model: a collision is ~impossible


def test_device_map_auto_generates_what_the_plain_run_does(tiny_model_dir, tmp_path, monkeypatch):
    """`--device-map auto` loads through accelerate's placement (on this CPU: every layer on the CPU) and generates
    the plain run's tokens with DAM on a profile that changes the output."""
    from helpers import random_profile

    from dam_cli.runtime import models

    load_model, placements = models.load_model, []

    def spy(*args, **kwargs):
        placements.append(kwargs.get("device_map"))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", spy)
    path = tmp_path / "random.safetensors"
    random_profile(model=load_model(tiny_model_dir).identity, L=16, seed=4).save(path)
    common = ["--model", tiny_model_dir, "--profile", str(path), "--prompt", "the cat and the dog " * 6,
              "--max-new-tokens", "6", "--ignore-eos", "--json"]
    code, plain, err = run_cli("generate", *common)
    assert code == 0, err
    code, placed, err = run_cli("generate", *common, "--device-map", "auto")
    assert code == 0, err
    code, full, err = run_cli("generate", *common, "--attention", "full")
    assert code == 0, err
    a, b = json.loads(plain), json.loads(placed)
    assert b["text"] == a["text"] != json.loads(full)["text"]
    assert (b["device"], b["backend"], b["peak_memory_kind"]) == ("cpu", cpu_backend(), "cpu peak rss")
    assert placements == [None, "auto", None]


@pytest.mark.parametrize("args, needle", [
    (["--device-map", "auto", "--device", "cpu"], "--device-map auto places the model itself"),
    (["--device-map", "auto", "--cuda-graph"], "drop --cuda-graph or --device-map auto"),
    (["--device-map", "gpu0"], "unknown --device-map 'gpu0'"),
])
def test_device_map_refusals_come_before_anything_loads(tiny_model_dir, tiny_all_allowed_profile, monkeypatch,
                                                       args, needle):
    from helpers import run_cli_refusing_loads

    run = run_cli_refusing_loads(monkeypatch, "loaded before the placement flags were checked")
    code, err = run("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt", "a",
                    *args)
    assert_one_line_error(code, err, 2, needle)


# ---- bad input: one line, non-zero exit -------------------------------------------------------

def test_profile_for_another_model_is_refused(tiny_model_dir):
    if not os.path.exists(SMOLLM2_PROFILE):
        pytest.skip("shipped SmolLM2 profile not built")
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", SMOLLM2_PROFILE, "--prompt", "the cat",
                           *BASE)
    assert_one_line_error(code, err, 1, "SmolLM2-135M-Instruct", "30 layers", "2 layers",
                          f"dam profile --model {tiny_model_dir}")


def test_corrupt_profile_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", str(bad), "--prompt", "the cat", *BASE)
    assert_one_line_error(code, err, 1, "not a valid DAM profile")


def test_prompt_longer_than_the_context_is_refused_with_numbers(tiny_model_dir, tiny_all_allowed_profile):
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt",
                           "cat " * 1100, *BASE)
    assert_one_line_error(code, err, 1, "1,100 tokens", "1,024")
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt",
                           "cat " * 1020, "--device", "cpu", "--max-new-tokens", "10")
    assert_one_line_error(code, err, 1, "1,020 tokens", "--max-new-tokens 4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_refused(tiny_model_dir, tiny_all_allowed_profile):
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt",
                           "the cat", "--device", "cuda")
    assert_one_line_error(code, err, 1, "no CUDA GPU", "--device cpu")


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "a", "--prompt-file", "x.txt"], "not both"),
    (["--prompt", "a", "--top-p", "0.9"], "--temperature"),
    (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "a", "--attention", "sparse"], "--attention"),
    (["--prompt", "   "], "empty"),
    (["--prompt", "a", "--cuda-graph"], "--cuda-graph needs a CUDA device"),
    (["--prompt", "a", "--cuda-graph", "--dynamic-topk", "2", "--dynamic-block", "32"], "multiple of 64"),
])
def test_bad_options_are_usage_errors(tiny_model_dir, tiny_all_allowed_profile, args, needle):
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--device",
                           "cpu", *args)
    assert_one_line_error(code, err, 2, needle)


@pytest.mark.parametrize("args, needle", [
    (["--dynamic-block", "50", "--dynamic-topk", "4"], "--dynamic-block must be a positive multiple of 16 up to 8192"),
    (["--dynamic-topk", "4", "--dynamic-block", "0"], "--dynamic-block must be a positive multiple of 16 up to 8192"),
    (["--dynamic-topk", "-1"], "--dynamic-topk must be an integer from 0"),
    (["--dynamic-topk", "0", "--dynamic-tail-topk", "4"], "--dynamic-tail-topk needs --dynamic-topk > 0"),
    (["--dynamic-topk", "2", "--dynamic-tail-topk", "-1"],
     "--dynamic-tail-topk must be an integer from 0 to 2,147,483,647, got -1"),
    (["--dynamic-topk", "2", "--dynamic-score", "max"], "unknown --dynamic-score 'max': choose one of mean, bound"),
    (["--dynamic-topk", "0", "--dynamic-score", "antisum"],
     "--dynamic-score antisum needs --dynamic-topk > 0 (the dynamic part on), got --dynamic-topk 0"),
])
def test_bad_dynamic_flags_are_usage_errors_named_before_the_model_loads(tiny_model_dir, tiny_all_allowed_profile,
                                                                         monkeypatch, args, needle):
    """Exit 2 with the flag the user typed, and no model (or profile) is ever loaded."""
    from dam_cli.artifact import profile as profile_mod
    from dam_cli.runtime import models

    def refuse(*_a, **_k):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(profile_mod, "load_profile", refuse)
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--device",
                           "cpu", "--prompt", "a", *args)
    assert_one_line_error(code, err, 2, needle)
    assert "topk-block" not in err  # the library's old names never reach the user


def test_run_generate_checks_the_dynamic_part_first(monkeypatch):
    """The library call names the same flags (GenerateConfig is what the CLI fills) before loading."""
    from dam_kernels.selection import DynamicSelection

    from dam_cli.errors import DamUsageError
    from dam_cli.runtime import models
    from dam_cli.runtime.generate import GenerateConfig, run_generate

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    with pytest.raises(DamUsageError, match="--dynamic-block must be a positive multiple of 16 up to 8192, got 50"):
        run_generate(GenerateConfig(profile="p.safetensors", prompt="a", dynamic=DynamicSelection(4, 50)))
    with pytest.raises(DamUsageError, match="--cuda-graph with the dynamic part needs --dynamic-block a multiple of 64"
                       ):
        run_generate(GenerateConfig(profile="p.safetensors", prompt="a", cuda_graph=True,
                                    dynamic=DynamicSelection(4, 32)))


@pytest.mark.parametrize("fields, needle", [
    (dict(temperature=float("nan")), "--temperature must be a finite number >= 0"),  # once torch's error, step one
    (dict(temperature=float("inf")), "--temperature must be a finite number >= 0"),  # once sampled uniformly
    (dict(seed=2**64), "--seed must be from 0 to 9,223,372,036,854,775,807"),  # once an overflow inside torch
    (dict(temperature=0.7, top_k=-1), "--top-k must be from 0"),
    (dict(max_new_tokens=0), "--max-new-tokens must be from 1"),
])
def test_run_generate_checks_sampling_as_the_cli_does(monkeypatch, fields, needle):
    from dam_cli.errors import DamUsageError
    from dam_cli.runtime import models
    from dam_cli.runtime.generate import GenerateConfig, run_generate

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    with pytest.raises(DamUsageError, match=needle):
        run_generate(GenerateConfig(profile="p.safetensors", prompt="a", **fields))


def test_dam_without_profile_is_a_usage_error(tiny_model_dir):
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--prompt", "a", "--device", "cpu")
    assert_one_line_error(code, err, 2, "--profile is required")


def test_chat_without_template_is_refused(tiny_model_dir, tiny_all_allowed_profile):
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt",
                           "a", "--chat", *BASE)
    assert_one_line_error(code, err, 1, "no chat template")


def test_help_has_examples():
    code, out, _ = run_cli("generate", "--help")
    assert code == 0 and "Examples" in out and "--prompt-file" in out and "--attention" in out


# ---- the real model ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_generates_beyond_L_with_the_shipped_profile():
    """Embedded SmolLM2 on the CPU, prompt longer than the profile's L = 512, chat template on."""
    if not os.path.exists(SMOLLM2_PROFILE):
        pytest.skip("shipped SmolLM2 profile not built")
    text = ("The lighthouse keeper wrote the date, the weather and the ships he saw in his log. " * 30
            + "\nWhat did the keeper write in his log?")
    code, out, err = run_cli("generate", "--profile", SMOLLM2_PROFILE, "--prompt", text, "--chat", "--device", "cpu",
                             "--max-new-tokens", "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_tokens"] > 512  # rows beyond L go through the extended patterns
    assert 1 <= r["new_tokens"] <= 3 and isinstance(r["text"], str)
    assert 0 < r["density"] < 0.5 and r["attention"] == "dam" and r["backend"] == cpu_backend()
