"""Beyond-paper profile options (issue 8): recorded in the recipe, stored, and applied exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli_subprocess

from dam_cli import masks
from dam_cli.artifact.profile import Profile, load_profile
from dam_cli.profiling.run import ProfileConfig, choose_retrieval_heads, recipe_of, run_profile


def test_choose_retrieval_heads_lowest_pattern_mass_first_ties_by_index():
    kept = torch.tensor([[0.9, 0.2, 0.5], [0.2, 0.95, 0.1]], dtype=torch.float64)
    full = choose_retrieval_heads(kept, 3)
    assert full.tolist() == [[False, True, False], [True, False, True]]
    assert choose_retrieval_heads(kept, 0).sum() == 0
    assert choose_retrieval_heads(kept, 99).all()


def test_recipe_records_options_and_faithful_default_stays_plain():
    base = recipe_of(ProfileConfig(output="x"), 512)
    assert base["variant"] == "faithful" and "min_support" not in base and "pattern_mass" not in base
    r = recipe_of(ProfileConfig(output="x", min_support=4, pattern_mass=0.9, retrieval_heads=2), 512)
    assert r["variant"] == "options" and r["min_support"] == 4 and r["pattern_mass"] == 0.9
    assert r["retrieval_heads"] == 2


def test_full_heads_round_trip_and_stage2(tmp_path):
    L = 8
    tm = torch.zeros(2, 3, L, L, dtype=torch.bool)
    none = torch.zeros(2, 3, L, dtype=torch.bool)
    full = torch.zeros(2, 3, dtype=torch.bool)
    full[1, 2] = True
    p = Profile.from_masks(tm, none, none, full_heads=full)
    p.save(tmp_path / "p.safetensors")
    q = load_profile(tmp_path / "p.safetensors")
    assert torch.equal(q.full, full) and q.meta.recipe["retrieval_heads"] == 1
    m = q.mask(1, 20)
    assert torch.equal(m[2], torch.tril(torch.ones(20, 20, dtype=torch.bool)))
    assert torch.equal(m[0], torch.eye(20, dtype=torch.bool))
    assert q.density(20)[1, 2] == 1.0
    # Without the option the tensor is absent from the file (faithful files are unchanged).
    Profile.from_masks(tm, none, none).save(tmp_path / "f.safetensors")
    assert load_profile(tmp_path / "f.safetensors").full_heads is None


def test_profile_with_options_end_to_end(tmp_path, tiny_model_dir):
    doc = tmp_path / "c.txt"
    doc.write_text("the cat of the house is on the tree . what is the value ? " * 20)
    common = dict(model=tiny_model_dir, calib=(str(doc),), samples=2, pcl=24, device="cpu")
    faithful = run_profile(ProfileConfig(output=str(tmp_path / "a.st"), **common)).profile
    opt = run_profile(ProfileConfig(output=str(tmp_path / "b.st"), pattern_mass=0.9, retrieval_heads=2,
                                    min_support=3, **common)).profile
    assert opt.full.sum() == 2
    # The mass option's patterns are mirrored inside L, so M contains every pattern cell.
    for layer in range(opt.n_layers):
        cells = masks.pattern_cells(24, opt.offsets[layer], opt.columns[layer])
        tmask = opt.layer_true_mask(layer)
        assert not (cells & ~(tmask | torch.eye(24, dtype=torch.bool))).any()
    # Options never remove what the faithful true mask keeps.
    assert not (faithful.true_mask & ~opt.true_mask).any()
    reloaded = load_profile(tmp_path / "b.st")
    assert torch.equal(reloaded.full, opt.full) and reloaded.meta.recipe["variant"] == "options"


def test_inspect_shows_full_heads(tmp_path):
    import json

    L = 8
    tm = torch.zeros(2, 3, L, L, dtype=torch.bool)
    none = torch.zeros(2, 3, L, dtype=torch.bool)
    full = torch.zeros(2, 3, dtype=torch.bool)
    full[0, 1] = full[1, 0] = True
    Profile.from_masks(tm, none, none, full_heads=full).save(tmp_path / "p.safetensors")
    r = run_cli_subprocess("inspect", str(tmp_path / "p.safetensors"), "--length", "64", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [lyr["classes"]["full"] for lyr in doc["layers"]] == [1, 1]
    # Density at 64 tokens: full heads 1.0, the others only their diagonal (64 of 2080 pairs).
    assert doc["layers"][0]["density_length"] == pytest.approx((1.0 + 2 * 64 / 2080) / 3)


def test_add_local_window_hand_worked():
    # L = 4, one head with nothing kept: a window of 2 keeps the diagonal and the one before it.
    tm = torch.zeros(1, 4, 4, dtype=torch.bool)
    off = torch.zeros(1, 4, dtype=torch.bool)
    off[0, 3] = True  # an existing offset stays
    m, o = masks.add_local_window(tm, off, 2)
    assert o.tolist() == [[True, True, False, True]]
    assert m[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert not off[0, 0]  # inputs untouched
    m0, o0 = masks.add_local_window(tm, off, 0)
    assert torch.equal(m0, tm) and torch.equal(o0, off)
    # Beyond L the offsets give the band: row 9 of a 12-key Stage-2 mask keeps keys 8, 9 (window)
    # and 6 (offset 3).
    row = masks.stage2_rows(m, o, torch.zeros(1, 4, dtype=torch.bool), torch.tensor([9]), 12)
    assert row[0, 0].nonzero().flatten().tolist() == [6, 8, 9]


def test_local_window_profile_is_the_plain_profile_plus_the_band(tmp_path, tiny_model_dir):
    """`--local-window W` changes nothing but adding the band: the same as applying
    masks.add_local_window to the profile made without it. Recorded in the recipe."""
    doc = tmp_path / "c.txt"
    doc.write_text("the cat of the house is on the tree . what is the value ? " * 20)
    common = dict(model=tiny_model_dir, calib=(str(doc),), samples=2, pcl=24, device="cpu", min_support=3,
                  tau=0.6)  # a sparse true mask on this tiny model, so the band adds cells
    plain = run_profile(ProfileConfig(output=str(tmp_path / "a.st"), **common)).profile
    win = run_profile(ProfileConfig(output=str(tmp_path / "b.st"), local_window=5, **common)).profile
    tm, off = masks.add_local_window(plain.true_mask, plain.offsets, 5)
    assert torch.equal(win.true_mask, tm) and torch.equal(win.offsets, off)
    assert torch.equal(win.columns, plain.columns)
    assert not torch.equal(win.true_mask, plain.true_mask)  # the band was not there before
    assert win.offsets[..., :5].all() and not plain.offsets[..., :5].all()
    reloaded = load_profile(tmp_path / "b.st")
    assert reloaded.meta.recipe["local_window"] == 5 and reloaded.meta.recipe["variant"] == "options"
    assert "local_window" not in plain.meta.recipe
    # The stored statistics describe the widened mask: `dam inspect --check` accepts the file.
    from dam_cli.inspection.check import check

    res = check(tmp_path / "b.st")
    assert res.valid, res.errors
    # Bad values are refused before any work.
    from dam_cli.errors import DamUsageError

    with pytest.raises(DamUsageError, match="--local-window must be from 0 to 2,147,483,647"):
        run_profile(ProfileConfig(output=str(tmp_path / "c.st"), local_window=-1, **common))


@pytest.mark.parametrize("changes, needle", [
    (dict(calib="/"), "calib must be a tuple of str paths (one file: calib=('/',))"),  # once read '/' as a folder
    (dict(calib=(b"c.txt",)), "calib must be a tuple of str paths"),
    (dict(eps=-1.0), "eps must be a small positive number"),  # once an assertion deep in the Box-Cox
    (dict(eps=float("nan")), "eps must be a small positive number"),
    (dict(eps=0.5), "eps must be a small positive number"),
    (dict(calib=None), "calib must be a tuple of str paths (() for the built-in text), got None"),
    (dict(tau="0.3"), "ProfileConfig.tau must be a number, got '0.3'"),  # once a raw TypeError
    (dict(pcl="16"), "ProfileConfig.pcl must be an int or None"),
    (dict(samples=2.0), "ProfileConfig.samples must be an int, got 2.0"),
    (dict(local_window=2.5), "ProfileConfig.local_window must be an int"),  # once truncated to 2 in silence
    (dict(seed=True), "ProfileConfig.seed must be an int"),
    (dict(device=None), "ProfileConfig.device must be a str"),  # once an AttributeError
    (dict(from_capture=5), "ProfileConfig.from_capture must be a str or None"),
    (dict(runtime="bogus"), "ProfileConfig.runtime must be a dict"),  # once written, then refused by the loader
    (dict(output=None), "ProfileConfig.output must be a file path"),
    (dict(min_support=2**63), "--min-support must be from 1 to 2,147,483,647"),  # once written, refused on load
    (dict(local_window=10**29), "--local-window must be from 0 to"),  # once an OverflowError after the capture
    (dict(needle_samples=10**20), "--needle-samples must be from 1 to 10,000"),  # once hung building codes
    (dict(needle_length=-1), "--needle-length must be from 0 to"),  # checked without --retrieval-by needle too
    (dict(lam=1e-320), "is so close to 0 that the Box-Cox transform rounds away"),  # once every mask empty
])
def test_library_options_the_cli_never_passes_are_checked_first(tmp_path, changes, needle):
    from dam_cli.errors import DamUsageError
    from dam_cli.profiling.config import validate

    with pytest.raises(DamUsageError) as e:
        validate(ProfileConfig(**{"output": str(tmp_path / "p.st"), **changes}))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p.st").exists()
