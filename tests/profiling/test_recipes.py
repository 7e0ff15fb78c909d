"""Named recipes: `dam profile` writes the recommended one by default, `--recipe paper` the paper's
exactly (the same ProfileConfig, hence the same bytes, as the library's defaults), and a profile
carries the run-time options its recipe recommends."""

from __future__ import annotations

import struct

import pytest
from helpers import REPO_ROOT, random_profile

from dam_cli.artifact.profile import load_profile
from dam_cli.errors import DamError, DamUsageError
from dam_cli.profiling import recipes
from dam_cli.profiling.recipes import recipe_fields
from dam_cli.profiling.run import ProfileConfig


def test_recipe_fields():
    assert recipe_fields("paper", {}) == {"runtime": None}
    rec = recipe_fields("recommended", {})
    assert rec == {**recipes.RECIPE_OPTIONS["recommended"], "runtime": recipes.RECIPE_RUNTIME["recommended"]}
    assert rec["runtime"]["dynamic"]["topk"] > 0
    # Restating a recipe value keeps its run-time options; changing a mask option voids them.
    assert recipe_fields("recommended", {"pattern_mass": 0.9})["runtime"] is not None
    assert recipe_fields("recommended", {"pattern_mass": 0.8})["runtime"] is None
    assert recipe_fields("recommended", {"tau": 0.5})["runtime"] is None
    assert recipe_fields("paper", {"min_support": 64}) == {"min_support": 64, "runtime": None}
    # No retrieval heads: nothing to choose them by.
    assert "retrieval_by" not in recipe_fields("recommended", {"retrieval_heads": 0})
    with pytest.raises(DamUsageError, match="--recipe must be one of"):
        recipe_fields("fast", {})


def test_runtime_choice_records_what_the_user_vouches_for():
    rec = recipes.RECIPE_RUNTIME["recommended"]
    # Without retrieval heads the recipe's run-time options are void, unless asked for by name.
    assert recipe_fields("recommended", {"retrieval_heads": 0})["runtime"] is None
    assert recipe_fields("recommended", {"retrieval_heads": 0}, "recommended")["runtime"] == rec
    assert recipe_fields("paper", {}, "recommended")["runtime"] == rec
    assert recipe_fields("recommended", {}, "none")["runtime"] is None
    assert recipe_fields("recommended", {}, "recipe")["runtime"] == rec
    with pytest.raises(DamUsageError, match="--runtime must be one of"):
        recipe_fields("recommended", {}, "fast")


def _cli_config(monkeypatch, *args) -> ProfileConfig:
    """The ProfileConfig `dam profile ARGS` builds (run_profile replaced by a recorder)."""
    from typer.testing import CliRunner

    import dam_cli.profiling.run as run
    from dam_cli.cli.app import app

    seen = []

    def record(cfg, reporter=None):
        seen.append(cfg)
        raise DamError("recorded")

    monkeypatch.setattr(run, "run_profile", record)
    r = CliRunner().invoke(app, ["profile", *args])
    assert seen, r.output
    return seen[0]


def test_cli_paper_recipe_is_the_library_default(monkeypatch, tmp_path):
    out = str(tmp_path / "p.safetensors")
    assert _cli_config(monkeypatch, "--recipe", "paper", "--output", out) == ProfileConfig(output=out)
    cfg = _cli_config(monkeypatch, "--output", out)  # the default: recommended
    assert (cfg.pattern_mass, cfg.min_support, cfg.retrieval_heads, cfg.retrieval_by) == (0.9, 64, 16, "needle")
    assert cfg.runtime == recipes.RECIPE_RUNTIME["recommended"]
    cap = str(tmp_path / "cap.h5")
    assert _cli_config(monkeypatch, "--from-capture", cap, "--output", out) == ProfileConfig(output=out,
                                                                                             from_capture=cap)
    cfg = _cli_config(monkeypatch, "--recipe", "paper", "--min-support", "64", "--output", out)
    assert cfg == ProfileConfig(output=out, min_support=64)


def _profile(runtime):
    """A random profile (2 layers x 3 heads, L = 16) carrying these run-time options."""
    from dataclasses import replace

    p = random_profile(n_layers=2, heads=3, L=16, p_r=0.2, p_c=0.2, seed=0)
    p.meta = replace(p.meta, runtime=runtime)
    return p


def test_runtime_options_round_trip_and_absent_without_them(tmp_path):
    runtime = recipes.RECIPE_RUNTIME["recommended"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _profile(runtime).save(a)
    _profile(None).save(b)
    assert load_profile(a).meta.runtime == runtime
    assert load_profile(b).meta.runtime is None
    assert b"dam.runtime" in a.read_bytes() and b"dam.runtime" not in b.read_bytes()


@pytest.mark.parametrize("bad,needle", [
    ('{"dynamic":{"topk":-1,"block":64,"tail_topk":null,"score":"mean"}}', "dam.runtime.dynamic is invalid"),
    ('{"dynamic":{"topk":9,"blok":64}}', "dam.runtime.dynamic must be a JSON object with keys"),
    ('{"speed":1}', "only key is"),
    ('[1]', "only key is"),
])
def test_bad_runtime_options_are_refused(tmp_path, bad, needle):
    good = tmp_path / "g.safetensors"
    _profile({"dynamic": {"topk": 9, "block": 64, "tail_topk": 32, "score": "mean"}}).save(good)
    data = good.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    import json

    header = json.loads(data[8:8 + n])
    header["__metadata__"]["dam.runtime"] = bad
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(DamError, match=needle):
        load_profile(path)


def test_cli_runtime_option(monkeypatch, tmp_path):
    out = str(tmp_path / "p.safetensors")
    cfg = _cli_config(monkeypatch, "--retrieval-heads", "0", "--runtime", "recommended", "--output", out)
    assert cfg.retrieval_heads == 0 and cfg.runtime == recipes.RECIPE_RUNTIME["recommended"]
    assert _cli_config(monkeypatch, "--retrieval-heads", "0", "--output", out).runtime is None


@pytest.mark.parametrize("name", ["smollm2-135m-instruct.safetensors", "gemma3-270m.safetensors"])
def test_shipped_recommended_profiles_carry_the_recipes_run_time_options(name):
    """What `dam generate` applies to a shipped recommended profile is what `dam profile` writes today, and valid."""
    import os

    from dam_kernels.selection import DynamicSelection

    runtime = load_profile(os.path.join(REPO_ROOT, "profiles", name)).meta.runtime
    assert runtime == recipes.RECIPE_RUNTIME["recommended"]
    DynamicSelection(**runtime["dynamic"]).validate()
