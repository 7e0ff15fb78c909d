"""`dam eval` with the shared dynamic options and the RULER-style suite: flags refused before any model
loads, suite scores per task and family on the tiny model, the same prompts for every method, full
attention equal to a keep-everything profile, and the split choosing the prompts."""

from __future__ import annotations

import json

import pytest
from dam_kernels.selection import DynamicSelection
from helpers import identity_profile, run_cli_subprocess

from dam_cli.errors import DamUsageError
from dam_cli.evaluation import suite_run
from dam_cli.evaluation.config import (
    SUITE_MAX_NEW_TOKENS,
    SUITE_TASKS,
    EvalConfig,
    split_task_names,
    suite_family,
    validate,
)
from dam_cli.evaluation.run import EvalRunConfig, eval_config, evaluate
from dam_cli.evaluation.suite import make_prompt, score, split_seeds
from dam_cli.runtime.models import model_identity

LENGTH = 320  # the shortest length every suite task fits in with the tiny word-level tokenizer


def _identity(model):
    return model_identity(model.config, "tiny-llama")


def _suite_config(**kw):
    base = dict(lengths=(LENGTH,), methods=("full", "dam", "streaming"), tasks=(), suite_tasks=SUITE_TASKS,
                per_task=1)
    base.update(kw)
    return EvalConfig(**base)


# ---- options ------------------------------------------------------------------------------------------

def test_task_names_split_into_ours_and_the_suite():
    assert split_task_names(["alignment", "passkey"]) == (("alignment", "passkey"), ())
    assert split_task_names(["suite"]) == ((), SUITE_TASKS)
    assert split_task_names(["vt", "suite:passkey", "passkey", "vt"]) == (("passkey",), ("vt", "passkey"))
    with pytest.raises(DamUsageError, match="unknown task 'niah'.*suite:passkey"):
        split_task_names(["niah"])
    assert [suite_family(t) for t in SUITE_TASKS] == ["niah"] * 4 + ["vt", "cwe", "fwe", "passkey", "memo"]


def test_eval_dynamic_defaults_agree():
    from dam_cli.cli import options

    assert EvalConfig(lengths=(64,)).dynamic == options.EVAL_DYNAMIC
    assert EvalRunConfig(profile="p").dynamic is None  # no flags: the profile's recommended setting, else the above


def test_suite_budgets_are_the_generators_own(tiny_tokenizer):
    """The answer room `validate` and the default lengths keep is each task's `meta["max_new_tokens"]`."""
    for task in SUITE_TASKS:
        assert make_prompt(task, tiny_tokenizer, LENGTH, 0, 0, "prose").meta["max_new_tokens"] == \
            SUITE_MAX_NEW_TOKENS[task]
    ident = {"max_position": 1024}
    validate(_suite_config(lengths=(1024 - 127,)), ident)
    with pytest.raises(DamUsageError, match="plus 128 generated tokens .* up to 897 with the tasks niah_single"):
        validate(_suite_config(lengths=(898,)), ident)
    validate(_suite_config(lengths=(1024 - 49,), suite_tasks=("fwe",)), ident)
    got = eval_config(EvalRunConfig(profile="p", tasks=("alignment", "suite")), 128, 1024)
    assert got.lengths == (128, 256, 512, 897) and got.suite_tasks == SUITE_TASKS and got.per_task == 3
    assert eval_config(EvalRunConfig(profile="p", tasks=("cwe",), quick=True), 128, 1024).per_task == 1


FLAG_CASES = [
    (["--dynamic-block", "50"], "--dynamic-block must be a positive multiple of 16 up to 8192, got 50"),
    (["--dynamic-topk", "-1"], "--dynamic-topk must be an integer from 0"),
    (["--dynamic-tail-topk", "-2"], "--dynamic-tail-topk must be an integer from 0 to 2,147,483,647, got -2"),
    (["--dynamic-topk", "0", "--dynamic-tail-topk", "3"], "--dynamic-tail-topk needs --dynamic-topk > 0"),
    (["--dynamic-score", "max"], "unknown --dynamic-score 'max'"),
    (["--methods", "full,dam-dynamic", "--dynamic-topk", "0"], "--dynamic-topk must be at least 1 for the *-dynamic"),
    (["--tasks", "suite,bogus"], "unknown task 'bogus'"),
    (["--split", "test"], "unknown --split 'test'"),
    (["--per-task", "0"], "--per-task must be from 1 to 10,000 (suite prompts a task and length), got 0"),
    (["--per-task", "1000000"], "--per-task must be from 1 to 10,000"),  # once ran on, memory growing, no line
    (["--prompt-form", "plain"], "unknown --prompt-form 'plain'"),
]


@pytest.mark.parametrize("args, message", FLAG_CASES)
def test_bad_flags_are_refused_before_anything_loads(args, message, monkeypatch, tmp_path):
    """Each bad value is a DamUsageError (exit 2) naming its flag, raised before the profile or model is read."""
    from typer.testing import CliRunner

    from dam_cli.artifact import profile as profile_module
    from dam_cli.cli.app import app
    from dam_cli.runtime import models

    def refuse(*a, **k):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr(profile_module, "load_profile", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    got = CliRunner().invoke(app, ["eval", "--profile", str(tmp_path / "p.safetensors"), *args])
    assert isinstance(got.exception, DamUsageError), got.exception
    assert message in str(got.exception) and got.exception.exit_code == 2


def test_bad_flag_exits_2_with_one_line(tmp_path):
    r = run_cli_subprocess("eval", "--profile", str(tmp_path / "none"), "--model", str(tmp_path / "no-model"),
                           "--dynamic-block", "50", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --dynamic-block must be a positive multiple of 16 up to 8192, got 50"]


# ---- the suite on the tiny model --------------------------------------------------------------------

def _short_answers(monkeypatch, most: int) -> list[tuple[list[int], int]]:
    """Record the ids and token budget of every suite answer, and generate at most `most` tokens (CPU time)."""
    fed: list[tuple[list[int], int]] = []
    answer = suite_run.greedy_answer

    def spy(model, tokenizer, ids, max_new_tokens, device, stop=None, graph=False):
        fed.append((list(ids), max_new_tokens))
        return answer(model, tokenizer, ids, min(most, max_new_tokens), device, stop, graph)

    monkeypatch.setattr(suite_run, "greedy_answer", spy)
    return fed


def test_suite_scores_every_task_on_the_same_prompts(tiny_llama, tiny_tokenizer, monkeypatch):
    ident = _identity(tiny_llama)
    fed = _short_answers(monkeypatch, 4)
    res = evaluate(tiny_llama, tiny_tokenizer, ident, identity_profile(ident, 32), _suite_config())
    json.dumps(res)
    n_tasks = len(SUITE_TASKS)
    # Methods in order, each on the same prompts in the same order.
    assert len(fed) == 3 * n_tasks and fed[:n_tasks] == fed[n_tasks:2 * n_tasks] == fed[2 * n_tasks:]
    suite = res["suite"]
    assert suite["split"] == "development" and suite["seeds"] == [0] and suite["per_task"] == 1
    assert suite["prompt_form"] == "completion" and suite["families"] == ["niah", "vt", "cwe", "fwe", "passkey", "memo"]
    want = suite_run.suite_prompts_by_length(tiny_tokenizer, _suite_config())[LENGTH]
    assert [r["task"] for r in suite["prompts"]] == list(SUITE_TASKS)
    assert fed[:n_tasks] == [(p.ids, p.meta["max_new_tokens"]) for p in want]
    for rec, p in zip(suite["prompts"], want, strict=True):
        assert rec["seed"] == 0 and rec["answers"] == list(p.answers) and rec["tokens"] == len(p.ids) <= LENGTH
        assert set(rec["outputs"]) == {"full", "dam", "streaming"}
        for out in rec["outputs"].values():
            assert out["score"] == score(p, out["output"])
    for m in ("full", "dam", "streaming"):
        s = suite["scores"][m][str(LENGTH)]
        assert set(s["tasks"]) == set(SUITE_TASKS) and all(0.0 <= v <= 1.0 for v in s["tasks"].values())
        niah = [s["tasks"][t] for t in SUITE_TASKS[:4]]
        assert s["families"]["niah"] == sum(niah) / 4 and s["families"]["cwe"] == s["tasks"]["cwe"]
        assert s["mean"] == sum(s["tasks"].values()) / len(SUITE_TASKS)
    # The density of dam and streaming is reported, matched, below full's.
    d = res["density"]
    assert d["full"][str(LENGTH)] == 1.0 and 0.0 < d["dam"][str(LENGTH)] < 1.0
    assert abs(d["streaming"][str(LENGTH)] - d["dam"][str(LENGTH)]) * (LENGTH + 1) / 2 <= 1.0
    assert res["config"]["dynamic"] == {"topk": 8, "block": 64, "tail_topk": 8, "score": "mean"}
    assert res["config"]["suite_tasks"] == list(SUITE_TASKS) and res["schema"] == 2


def test_keep_everything_profile_answers_as_full(tiny_llama, tiny_tokenizer, monkeypatch):
    """A profile allowing every causal pair (prompt plus answer < 2L) gives full attention's outputs exactly,
    so equal scores; the held-out split's first seed is used."""
    ident = _identity(tiny_llama)
    _short_answers(monkeypatch, 12)
    cfg = _suite_config(methods=("full", "dam"), suite_tasks=("niah_multikey", "vt", "fwe"), split="heldout-b")
    res = evaluate(tiny_llama, tiny_tokenizer, ident, identity_profile(ident, 256, every=True), cfg)
    assert res["suite"]["seeds"] == [2_000_000] == [r["seed"] for r in res["suite"]["prompts"]][:1]
    for rec in res["suite"]["prompts"]:
        assert rec["outputs"]["dam"] == rec["outputs"]["full"]
    assert res["suite"]["scores"]["dam"] == res["suite"]["scores"]["full"]
    assert res["density"]["dam"][str(LENGTH)] == 1.0


def test_split_chooses_the_prompts(tiny_tokenizer):
    by_split = {}
    for split in ("development", "heldout-a", "heldout-b"):
        cfg = _suite_config(split=split, per_task=2)
        prompts = suite_run.suite_prompts_by_length(tiny_tokenizer, cfg)[LENGTH]
        assert [p.meta["seed"] for p in prompts] == list(split_seeds(split, 2)) * len(SUITE_TASKS)
        by_split[split] = [p.text for p in prompts]
    assert len({text for texts in by_split.values() for text in texts}) == 3 * 2 * len(SUITE_TASKS)
    with pytest.raises(DamUsageError, match="chat form needs a tokenizer with a chat template"):
        suite_run.suite_prompts_by_length(tiny_tokenizer, _suite_config(prompt_form="chat"))


def test_cli_suite_table_and_output(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    ident = model_identity(AutoConfig.from_pretrained(tiny_model_dir), "tiny")
    path = str(tmp_path / "p.safetensors")
    identity_profile(ident, 64).save(path)
    out, png = str(tmp_path / "res.json"), str(tmp_path / "suite.png")
    r = run_cli_subprocess("eval", "--model", tiny_model_dir, "--profile", path, "--tasks", "vt,suite:passkey",
                           "--lengths", str(LENGTH), "--per-task", "1", "--split", "heldout-a", "--methods", "full,dam",
                           "--device", "cpu", "--quiet", "--output", out, "--png", png, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(png, "rb") as f:  # the suite alone is drawn (one panel: its one length)
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 200
    assert "heldout-a" in r.stdout and "vt" in r.stdout and "passkey" in r.stdout
    assert "agree" not in r.stdout  # no alignment / retrieval table without those tasks
    with open(out) as f:
        res = json.load(f)
    assert res["suite"]["tasks"] == ["vt", "passkey"] and res["suite"]["seeds"] == [1_000_000]
    assert res["config"]["tasks"] == [] and set(res["suite"]["scores"]) == {"full", "dam"}
    assert res["config"]["dynamic"] == DynamicSelection(8, 64).as_dict()


def test_suite_panel_draws_each_familys_mean_per_method():
    from dam_cli.cli.eval_png import suite_bars

    scores = {"full": {"4096": {"families": {"niah": 0.5, "vt": 1.0}, "mean": 0.6}},
              "dam": {"4096": {"families": {"niah": 0.25}, "mean": 0.2}}}
    result = {"methods": ["full", "dam"], "suite": {"families": ["niah", "vt"], "scores": scores}}
    families, bars = suite_bars(result, 4096)
    assert families == ["niah", "vt", "mean"]
    assert bars["full"] == [0.5, 1.0, 0.6]
    assert bars["dam"][0] == 0.25 and bars["dam"][1] != bars["dam"][1] and bars["dam"][2] == 0.2  # vt absent: NaN
