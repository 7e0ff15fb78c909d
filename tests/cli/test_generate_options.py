"""`dam generate` option values checked before torch work or any model load: one line, exit 2, the flag named.

NaN and infinities parse as floats and integers of any size as ints, so each range is checked by
`dam_cli.cli.generate`; flags this machine cannot honour (`--backend triton`, `--cuda-graph` on
the CPU) name the flag, not the library's parameter.
"""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli_refusing_loads

BASE = ["generate", "--profile", "never-read.safetensors", "--prompt", "a", "--model", "never-loaded"]


@pytest.fixture()
def dam(monkeypatch):
    """Run `dam ARGS` in-process: (exit code, stderr); fail if a model or profile would load."""
    return run_cli_refusing_loads(monkeypatch, "loaded before the options were checked")


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--temperature", "1", "--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--temperature", "1", "--top-k", "-1"], "--top-k must be from 0 to 2,147,483,647 (0 = all tokens), got -1"),
    (["--seed", "-1"], "--seed must be from 0 to 9,223,372,036,854,775,807 (2^63 - 1), got -1"),
    (["--seed", str(2**70)], "--seed must be from 0 to 9,223,372,036,854,775,807 (2^63 - 1), got 1,180,591,"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be from 1 to 100,000,000, got 0"),
    (["--max-new-tokens", str(10**12)], "--max-new-tokens must be from 1 to 100,000,000, got 1,000,000,000,000"),
])
def test_sampling_values_out_of_range_are_usage_errors(dam, args, needle):
    code, err = dam(*BASE, "--device", "cpu", *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_flags_a_cpu_cannot_honour_name_the_flag(dam, device):
    where = "--device cpu was given" if device == "cpu" else "this machine has no CUDA GPU"
    code, err = dam(*BASE, "--device", device, "--backend", "triton")
    assert code == 2 and err.count("\n") == 1, err
    assert f"--backend triton needs a CUDA GPU, and {where}: use --backend auto or reference" in err
    assert "backend=" not in err and "'reference'" not in err  # the flag, never the library's parameter
    code, err = dam(*BASE, "--device", device, "--cuda-graph")
    assert code == 2 and err.count("\n") == 1, err  # docs/guides/generate.md: exit 2 (it was 1 with auto)
    assert "--cuda-graph needs a CUDA device" in err and "drop" in err
    if device == "auto":
        assert f"--cuda-graph needs a CUDA device, and {where}: drop --cuda-graph" in err
    no_profile = [a for a in BASE if a not in ("--profile", "never-read.safetensors")]
    code, err = dam(*no_profile, "--device", device, "--backend", "triton", "--attention", "full")
    assert "loaded before the options were checked" in err  # --attention full runs no DAM kernel: it goes on


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_keeps_its_own_message(dam):
    code, err = dam(*BASE, "--device", "cuda", "--backend", "triton")
    assert code == 1 and "no CUDA GPU is available: use --device cpu" in err, err


@pytest.mark.parametrize("args, note", [
    (["--dynamic-topk", "4"], "note: --dynamic-* applies to --attention dam only: ignored with --attention full"),
    (["--backend", "reference", "--dynamic-mass", "0.5"],
     "note: --dynamic-* and --backend apply to --attention dam only: ignored with --attention full"),
])
def test_dam_options_with_full_attention_are_noted_as_ignored(dam, args, note):
    code, err = dam(*BASE, "--device", "cpu", "--attention", "full", *args)
    assert note in err and "loaded before the options were checked" in err, err  # said before the model loads


def test_dynamic_flags_ignored_with_full_attention_are_not_checked_against_no_profile(dam):
    """The note says they are ignored, so the run goes on (was: the note, then a refusal of --dynamic-score
    antisum against the no-profile setting, whose dynamic part is off)."""
    no_profile = [a for a in BASE if a not in ("--profile", "never-read.safetensors")]
    code, err = dam(*no_profile, "--device", "cpu", "--attention", "full", "--dynamic-score", "antisum")
    assert "ignored with --attention full" in err and "needs --dynamic-topk" not in err, err
    assert "loaded before the options were checked" in err, err  # it went on to load the model


def test_full_attention_alone_has_no_note(dam):
    code, err = dam(*BASE, "--device", "cpu", "--attention", "full")
    assert "note:" not in err, err
