"""A profile's recommended run-time options (`dam.runtime`) apply when the user gives none: in
`enable_dam`, in `dam generate` (reported in its JSON), and as `dam eval`'s dynamic setting; any
dynamic flag overrides its own field of them (the others stay the profile's), and an explicit `dynamic=`
argument replaces them whole."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from conftest import build_tiny_llama
from dam_kernels.selection import DynamicFlags, DynamicSelection
from helpers import MODEL_FIELDS_WITH_CONTEXT, all_allowed_profile, run_cli

from dam_cli.artifact.profile import Profile
from dam_cli.runtime import backend
from dam_cli.runtime.models import model_identity

RUNTIME = {"dynamic": {"topk": 2, "block": 16, "tail_topk": 3, "score": "mean", "tail_mass": 0.9}}


def _profile(model_or_ident, runtime=RUNTIME) -> Profile:
    """The all-allowed profile (L = 16) for a loaded model or an identity, with these run-time options."""
    p = all_allowed_profile(model=model_or_ident, L=16, fields=MODEL_FIELDS_WITH_CONTEXT)
    p.meta = replace(p.meta, runtime=runtime)
    return p


def test_enable_dam_uses_the_profiles_setting_unless_told():
    model = build_tiny_llama()
    prof = _profile(model)
    backend.enable_dam(model, prof, backend="reference")
    assert backend.dynamic_of(model) == DynamicSelection(**RUNTIME["dynamic"])
    backend.enable_dam(model, prof, backend="reference", dynamic=None)  # explicit: off
    assert backend.dynamic_of(model) is None
    backend.enable_dam(model, prof, backend="reference", dynamic=DynamicSelection(1, 32))
    assert backend.dynamic_of(model) == DynamicSelection(1, 32)
    backend.enable_dam(model, _profile(model, runtime=None), backend="reference")  # nothing recommended: off
    assert backend.dynamic_of(model) is None
    backend.disable_dam(model)


def test_generate_reports_the_profiles_setting_and_flags_override(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    ident = model_identity(AutoConfig.from_pretrained(tiny_model_dir), os.path.basename(tiny_model_dir))
    path = tmp_path / "rec.safetensors"
    _profile(ident).save(path)
    base = ["--model", tiny_model_dir, "--profile", str(path), "--device", "cpu", "--max-new-tokens", "3",
            "--ignore-eos", "--prompt", "the cat is on the", "--json"]
    code, out, err = run_cli("generate", *base, stdin="")
    assert code in (0, None), err
    assert json.loads(out)["dynamic"] == DynamicSelection(**RUNTIME["dynamic"]).as_dict()
    code, out, err = run_cli("generate", *base, "--dynamic-topk", "0", stdin="")  # a flag overrides: off
    assert code in (0, None), err
    assert json.loads(out)["dynamic"] is None
    code, out, err = run_cli("generate", *base, "--dynamic-topk", "4", stdin="")  # its field only
    assert code in (0, None), err
    assert json.loads(out)["dynamic"] == DynamicSelection(**{**RUNTIME["dynamic"], "topk": 4}).as_dict()


def test_a_flag_the_profiles_setting_cannot_take_is_refused_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """`--dynamic-tail-topk` alone is a budget for a dynamic part that a profile without a recommended setting
    does not turn on: exit 2 naming the flags, once the profile is read, and the model never loads."""
    from transformers import AutoConfig

    from dam_cli.runtime import models

    ident = model_identity(AutoConfig.from_pretrained(tiny_model_dir), os.path.basename(tiny_model_dir))
    path = tmp_path / "plain.safetensors"
    _profile(ident, runtime=None).save(path)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--profile", str(path), "--device", "cpu",
                           "--prompt", "a", "--dynamic-tail-topk", "4")
    assert code == 2 and "--dynamic-tail-topk needs --dynamic-topk > 0" in err, err
    assert len(err.strip().splitlines()) == 1


def test_eval_takes_the_profiles_setting_when_no_flag_is_given(monkeypatch, tmp_path):
    """run_eval resolves cfg.dynamic=None to the (options) profile's recommended setting before evaluating."""
    import dam_cli.evaluation.run as run

    model = build_tiny_llama()
    prof = _profile(model)
    seen = {}

    def fake_evaluate(model, tok, identity, profile, config, **kw):
        seen["dynamic"] = config.dynamic
        return {"profile": {}}

    class Loaded:
        pass

    loaded = Loaded()
    loaded.model, loaded.tokenizer, loaded.identity = model, None, backend.model_identity_of(model)
    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    monkeypatch.setattr("dam_cli.artifact.profile.load_profile", lambda path: prof)
    monkeypatch.setattr("dam_cli.runtime.models.load_model", lambda *a, **k: loaded)
    cfg = run.EvalRunConfig(profile="p.safetensors", lengths=(32,), methods=("full", "dam-dynamic"),
                            tasks=("alignment",), device="cpu")
    run.run_eval(cfg)
    assert seen["dynamic"] == DynamicSelection(**RUNTIME["dynamic"])
    run.run_eval(replace(cfg, dynamic=DynamicFlags((("topk", 5), ("score", "bound")))))  # `--dynamic-topk 5 ...`
    assert seen["dynamic"] == DynamicSelection(**{**RUNTIME["dynamic"], "topk": 5, "score": "bound"})
    run.run_eval(replace(cfg, dynamic=DynamicSelection(3, 32)))  # a whole setting replaces it
    assert seen["dynamic"] == DynamicSelection(3, 32)


def test_a_tail_mass_flag_alone_keeps_the_prompts_share():
    """`--dynamic-tail-mass 1.0` over the shipped setting (antisum, tail 0.9, no separate prompt share) changes
    the question's and decoded tokens' budget only: the prompt keeps 0.9 of its estimate, as before the flag."""
    shipped = DynamicSelection(topk=32, block=64, tail_topk=32, score="antisum", tail_mass=0.9)
    whole = DynamicFlags((("tail_mass", 1.0), ("tail_topk", 64))).over(shipped)
    assert whole == replace(shipped, tail_mass=1.0, tail_topk=64, mass=0.9)
    assert whole.prompt_mass == 0.9
    # Both given: both taken; the prompt's share alone: the tail stays.
    both = DynamicFlags((("tail_mass", 1.0), ("mass", 0.95))).over(shipped)
    assert (both.tail_mass, both.prompt_mass) == (1.0, 0.95)
    assert DynamicFlags((("mass", 0.95),)).over(shipped).tail_mass == 0.9
    # The same value as the prompt's share, or a score without a mass estimate: nothing pinned.
    assert DynamicFlags((("tail_mass", 0.9),)).over(shipped) == shipped
    mean = DynamicFlags((("tail_mass", 0.8), ("score", "mean"))).over(shipped)
    assert mean.mass is None and mean.tail_mass == 0.8
    # A base without a prompt share (the mean score) is unchanged by the rule.
    plain = DynamicSelection(topk=8, block=64)
    assert DynamicFlags((("tail_mass", 0.9),)).over(plain) == replace(plain, tail_mass=0.9)


def test_a_tail_mass_of_zero_turns_the_mass_rule_off():
    """`--dynamic-tail-mass 0` over a profile that records the mass rule: the top-k blocks by the pooled mean (or
    the score given), no tail mass, no prompt share; valid, where there was no way to turn the rule off."""
    shipped = DynamicSelection(topk=32, block=64, tail_topk=32, score="antisum", tail_mass=0.9, mass=0.95)
    top9 = DynamicFlags((("topk", 9), ("tail_topk", 32), ("tail_mass", 0))).over(shipped)
    assert top9 == DynamicSelection(topk=9, block=64, tail_topk=32, score="mean") and top9.validate() is top9
    bound = DynamicFlags((("tail_mass", 0), ("score", "bound"))).over(shipped)
    assert (bound.score, bound.tail_mass, bound.mass) == ("bound", None, None)
