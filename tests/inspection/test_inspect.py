"""`dam inspect`: hand-made profiles whose every number is worked out below, head-class rules,
comparison, --check, bad input, and the PNG.

The main profile `A` has 2 layers x 2 heads and PCL L = 8 (36 causal pairs; 136 at S = 16):

  (0,0) M = diagonal only             |M| =  8   R = {0}     C = {7}     diagonal-only
  (0,1) M = diagonal + column 0       |M| = 15   R = {0, 7}  C = {0, 7}  sink-only
  (1,0) M = diagonals r = 0, 1        |M| = 15   R = {0, 1}  C = {6, 7}  mixed (6 is a global column)
  (1,1) M = diagonal + column 4 (i>=4) |M| = 11  R = {0}     C = {4, 7}  global-columns

R and C follow the spec's rule (gamma >= mu = 0.8): e.g. column 7 holds one cell, (7, 7), always
set. At L = 8 edge patterns are those with fewer than max(2, L/8) = 2 cells: offset 7, column 7.
Stage-2 rows i in [8, 16) allow |R| + |C| + [0 not in R] keys minus #{c in C : i - c in R}:
  (0,0) 2 per row                               -> 8 + 16 = 24 of 136
  (0,1) 4 per row, minus 1 at i = 14 (7 + 7)    -> 15 + 31 = 46
  (1,0) 4 per row, minus 1 at i = 8 (7 + 1)     -> 15 + 31 = 46
  (1,1) 3 per row                               -> 11 + 24 = 35
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHIPPED_PROFILE, run_cli

from dam_cli import masks
from dam_cli.artifact.profile import Profile, default_stats, load_profile
from dam_cli.inspection import summary as lib
from dam_cli.inspection.check import causal_diagonal_counts, check
from dam_cli.inspection.classes import ClassRules, HeadClass, classify_head
from dam_cli.inspection.common import ranges
from dam_cli.inspection.compare import compare

L = 8
MASS = torch.tensor([[0.75, 0.5], [0.875, 0.25]])  # exact in float32


def _head_masks(kind: str, L: int = L) -> torch.Tensor:
    i = torch.arange(L)
    eye = i[:, None] == i[None, :]
    if kind == "diag":
        return eye
    if kind == "sink":
        return eye | (i[None, :] == 0).expand(L, L)
    if kind == "band2":
        return ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) <= 1)
    if kind.startswith("col"):
        c = int(kind[3:])
        return eye | ((i[None, :] == c) & (i[:, None] >= c))
    raise ValueError(kind)


def _profile(kinds: list[list[str]], mass: torch.Tensor | None = MASS, **overrides) -> Profile:
    tm = torch.stack([torch.stack([_head_masks(k) for k in row]) for row in kinds])
    R, C = masks.match_patterns(tm, 0.8)
    stats = default_stats(tm, R, C, mean_attn_mass_kept=mass)
    return Profile.from_masks(tm, R, C, stats=stats, **overrides)


KINDS_A = [["diag", "sink"], ["band2", "col4"]]
KINDS_B = [["diag", "sink"], ["band2", "col3"]]  # head (1,1) keeps column 3 instead of 4


@pytest.fixture()
def prof_a(tmp_path: Path) -> str:
    path = tmp_path / "a.safetensors"
    _profile(KINDS_A).save(path)
    return str(path)


@pytest.fixture()
def prof_b(tmp_path: Path) -> str:
    path = tmp_path / "b.safetensors"
    _profile(KINDS_B, tau=0.4).save(path)
    return str(path)


# =========================================================================================
# The hand-made profile: every number
# =========================================================================================

def test_patterns_of_the_hand_made_profile_are_as_worked_out():
    p = _profile(KINDS_A)
    got = [[(np.flatnonzero(p.offsets[l, h].numpy()).tolist(), np.flatnonzero(p.columns[l, h].numpy()).tolist())
            for h in range(2)] for l in range(2)]
    assert got == [[([0], [7]), ([0, 7], [0, 7])], [([0, 1], [6, 7]), ([0], [4, 7])]]


def test_summary_numbers_are_exact(prof_a):
    s = lib.summarize(prof_a, 16)
    heads = [(h.layer, h.head, h.head_class, h.true_density, h.density_pcl, h.density_length, h.mass_kept)
             for h in s.heads]
    assert heads == [
        (0, 0, HeadClass.DIAGONAL_ONLY, 8 / 36, 8 / 36, 24 / 136, 0.75),
        (0, 1, HeadClass.SINK_ONLY, 15 / 36, 15 / 36, 46 / 136, 0.5),
        (1, 0, HeadClass.MIXED, 15 / 36, 15 / 36, 46 / 136, 0.875),
        (1, 1, HeadClass.GLOBAL_COLUMNS, 11 / 36, 11 / 36, 35 / 136, 0.25),
    ]
    assert [(x.density_pcl, x.density_length, x.offsets_mean, x.columns_mean) for x in s.layers] == [
        (pytest.approx(23 / 72, abs=0, rel=1e-15), pytest.approx(70 / 272, rel=1e-15), 1.5, 1.5),
        (pytest.approx(26 / 72, rel=1e-15), pytest.approx(81 / 272, rel=1e-15), 1.5, 2.0),
    ]
    assert s.layers[0].classes == {"nearly-dense": 0, "diagonal-only": 1, "sink-only": 1,
                                   "global-columns": 0, "local-band": 0, "mixed": 0}
    assert s.layers[1].classes == {"nearly-dense": 0, "diagonal-only": 0, "sink-only": 0,
                                   "global-columns": 1, "local-band": 0, "mixed": 1}
    assert s.density_pcl == pytest.approx(49 / 144, rel=1e-15)
    assert s.density_length == pytest.approx(151 / 544, rel=1e-15)


def test_density_at_pcl_counts_the_diagonal_guard(tmp_path):
    # M = column 0 only: (0,0) is on the diagonal; rows 1..7 gain their diagonal from the guard.
    i = torch.arange(L)
    tm = (i[None, :] == 0).expand(L, L).clone()[None, None]
    R, C = masks.match_patterns(tm, 0.8)
    Profile.from_masks(tm, R, C).save(tmp_path / "p.safetensors")
    s = lib.summarize(tmp_path / "p.safetensors", L)
    assert (s.heads[0].true_density, s.heads[0].density_pcl, s.heads[0].density_length) == (8 / 36, 15 / 36, 15 / 36)


def test_stage2_row_counts_agree_exactly_with_the_math_module():
    for L_, seed in ((8, 0), (13, 1), (40, 2)):
        g = torch.Generator().manual_seed(seed)
        tm = torch.tril(torch.rand(2, 3, L_, L_, generator=g) < 0.3)
        R, C = torch.rand(2, 3, L_, generator=g) < 0.3, torch.rand(2, 3, L_, generator=g) < 0.3
        p = Profile.from_masks(tm, R, C)
        for S in (1, L_ - 1, L_, L_ + 1, 2 * L_ - 2, 2 * L_ - 1, 2 * L_, 3 * L_ + 5):
            want = masks.allowed_per_row(tm, R, C, S).numpy()
            got = lib.stage2_row_counts(p.true_mask_packed.numpy(), R.numpy(), C.numpy(), S)
            assert np.array_equal(got, want), (L_, S)


def test_causal_diagonal_counts_agree_with_the_math_module():
    g = torch.Generator().manual_seed(3)
    for L_ in (1, 2, 8, 37):
        tm = torch.tril(torch.rand(3, 2, L_, L_, generator=g) < 0.4)
        assert np.array_equal(causal_diagonal_counts(tm.numpy()), masks.diagonal_counts(tm).numpy())


def test_look_items_follow_the_documented_rules(prof_a):
    s = lib.summarize(prof_a, 16)
    assert [(x.layer, x.head, x.rules) for x in s.look] == [
        (0, 0, ["least-mass", "diagonal-only"]),
        (0, 1, ["densest", "least-mass"]),
        (1, 0, ["densest"]),
        (1, 1, ["densest", "least-mass"]),
    ]
    # Each reason says what the rule means, with the head's figure (46/136 = 33.82%, 35/136 = 25.74%).
    assert s.look[0].reasons == ["one of the 3 keeping the least attention mass: 75.0% kept in M",
                                 "diagonal-only: beyond PCL a query sees only itself"]
    assert s.look[1].reasons[0] == "one of the 3 densest at --length: 33.82% of causal pairs"
    assert s.look[3].reasons[0] == "one of the 3 densest at --length: 25.74% of causal pairs"


def test_heads_worth_a_look_read_plainly(prof_a):
    code, out, _ = run_cli("inspect", prof_a, "--length", "16", columns=150)
    assert code == 0
    text = " ".join(out[out.index("heads worth a look"):].split())
    assert "3 densest heads at --length 16: they cost the most beyond PCL: layer 0 head 1 (33.8%); " \
           "layer 1 head 0 (33.8%); layer 1 head 1 (25.7%)" in text
    assert "3 heads keep the least attention mass in M: the attention they drop is lost (candidates for " \
           "--retrieval-heads): layer 0 head 0 (75.0% kept); layer 0 head 1 (50.0% kept); layer 1 head 1 " \
           "(25.0% kept)" in text
    assert "1 head is diagonal-only: beyond PCL a query sees only itself: layer 0 head 0" in text
    assert "keeping least" not in text  # the old cryptic wording


def test_full_heads_are_not_listed_as_densest(tmp_path):
    full = torch.tensor([[False, True], [False, False]])
    p = _profile(KINDS_A)
    Profile.from_masks(p.true_mask, p.offsets, p.columns, stats=p.stats, full_heads=full,
                       meta=p.meta).save(tmp_path / "f.safetensors")
    s = lib.summarize(tmp_path / "f.safetensors", 16)
    assert s.head(0, 1).density_length == 1.0
    assert [(x.layer, x.head) for x in s.look if "densest" in x.rules] == [(0, 0), (1, 0), (1, 1)]


def test_default_length_is_8_pcl_capped_by_max_position(tmp_path):
    _profile(KINDS_A).save(tmp_path / "a.safetensors")
    assert lib.summarize(tmp_path / "a.safetensors").length == 64
    _profile(KINDS_A, max_position=20).save(tmp_path / "c.safetensors")
    assert lib.summarize(tmp_path / "c.safetensors").length == 20


def test_a_length_beyond_the_models_context_is_noted(tmp_path):
    """--length past the model's max position is shown (the masks extend there) with a note that the model never
    runs there; at or inside it, no note."""
    _profile(KINDS_A, max_position=20).save(tmp_path / "c.safetensors")
    for length, noted in ((21, True), (20, False)):
        code, out, _ = run_cli("inspect", str(tmp_path / "c.safetensors"), "--length", str(length), columns=400)
        assert code == 0 and ("beyond the model's context of 20 tokens" in out) is noted, out


def test_json_shape_and_numbers(prof_a):
    code, out, err = run_cli("inspect", prof_a, "--length", "16", "--json", columns=150)
    assert code == 0 and err == ""
    d = json.loads(out)  # nothing but JSON on stdout
    assert d["kind"] == "dam-inspect" and d["json_version"] == 1
    assert d["shape"] == {"n_layers": 2, "n_heads": 2, "pcl": 8} and d["length"] == 16
    assert d["header"]["recipe"]["tau"] == 0.3 and d["header"]["schema"] == 2
    assert d["class_rules"] == {"sink_width": 4, "local_width": 64, "dense_at": 0.5, "edge_fraction": 0.125}
    h = d["heads"][3]
    assert h == {"layer": 1, "head": 1, "class": "global-columns", "true_density": 11 / 36,
                 "density_pcl": 11 / 36, "density_length": 35 / 136, "mass_kept": 0.25,
                 "offsets": [0], "columns": [4, 7], "n_offsets": 1, "n_columns": 2}
    assert d["layers"][1]["classes"]["mixed"] == 1 and d["layers"][1]["columns_mean"] == 2.0
    assert [(x["layer"], x["head"]) for x in d["look"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert d["picture"] is None


def test_unknown_mass_kept_is_null_in_json(tmp_path):
    _profile(KINDS_A, mass=None).save(tmp_path / "n.safetensors")
    code, out, _ = run_cli("inspect", str(tmp_path / "n.safetensors"), "--json", columns=150)
    d = json.loads(out)
    assert code == 0 and [h["mass_kept"] for h in d["heads"]] == [None] * 4
    assert all("least attention mass" not in r for x in d["look"] for r in x["reasons"])


def test_text_table_rows(prof_a):
    code, out, err = run_cli("inspect", prof_a, "--length", "16", columns=150)
    assert code == 0 and err == ""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 11 and cells[0].isdigit() and cells[1].endswith("%"):
            rows[int(cells[0])] = cells[1:]
    # layer: @8, @16, |R|, |C|, dense, diag, sink, global, local, mixed
    assert rows[0] == ["31.9%", "25.7%", "1.5", "1.5", "·", "1", "1", "·", "·", "·"]
    assert rows[1] == ["36.1%", "29.8%", "1.5", "2.0", "·", "·", "·", "1", "·", "1"]
    assert "SmolLM2" not in out and "synthetic" in out and "PCL 8, tau 0.3" in out
    assert "1 head is diagonal-only: beyond PCL a query sees only itself:\n    layer 0 head 0\n" in out
    # The true-mask density (as `dam profile` prints it) and the Stage-2 densities, each labelled.
    assert "M density    0.3403 (34.03%) of the causal pairs inside L = 8" in out  # (8 + 15 + 15 + 11) / 4 of 36
    assert "Stage-2      34.0% of causal pairs at S = 8, 27.8% at --length 16" in out  # 49/144, 151/544


def test_layer_and_head_picture(prof_a):
    code, out, _ = run_cli("inspect", prof_a, "--length", "16", "--layer", "1", "--head", "1", columns=150)
    assert code == 0
    assert "layer 1 head 1: global-columns" in out
    assert "offsets R (1): 0" in out and "columns C (2): 4, 7" in out
    assert "Stage-2 mask, 16 x 16" in out
    s = lib.summarize(Path(prof_a), 16, layer=1, head=1, grid=64)
    pic = s.picture
    # Grids at most L and S cells: each cell is one pair, so the pictures are the masks themselves.
    assert np.array_equal(pic.true_mask, _head_masks("col4").numpy().astype(float))
    want = masks.stage2_mask(_head_masks("col4"), torch.tensor([True] + [False] * 7),
                             torch.tensor([i in (4, 7) for i in range(8)]), 16).numpy().astype(float)
    assert pic.stage2_exact and np.array_equal(pic.stage2, want)


def test_colour_picture_uses_half_blocks(prof_a):
    import io

    from rich.console import Console

    from dam_cli.inspection.render import render_head

    s = lib.summarize(prof_a, 16, layer=0, head=1, grid=8)
    buf = io.StringIO()
    render_head(s, s.picture, Console(file=buf, force_terminal=True, color_system="truecolor", width=100))
    text = buf.getvalue()
    assert text.count("▀") == 8 * 4 + 8 * 4  # two 8 x 8 grids, two cell rows per character row
    assert "\x1b[38;2;" in text  # 24-bit colours


def test_head_picture_pools_cells_and_samples_long_rows(prof_a):
    p = load_profile(prof_a)
    pic = lib.head_picture(p, 0, 0, 1000, grid=4)  # diagonal-only head: R = {0}, C = {7}
    # True mask 8 x 8 in 4 x 4 cells of 2 x 2 pairs: the diagonal gives 2/4 on the cell diagonal.
    assert np.array_equal(pic.true_mask, np.eye(4) * 0.5)
    assert not pic.stage2_exact  # 250-row cells, 8 rows read each
    # Rows beyond L allow keys 7 and i: cell (0, 0) of rows 0..249 has 250 diagonal pairs + column 7.
    assert pic.stage2.shape == (4, 4) and pic.stage2[0, 1] == 0 and pic.stage2[3, 0] == pytest.approx(1 / 250)


def test_per_layer_head_table(prof_a):
    code, out, _ = run_cli("inspect", prof_a, "--length", "16", "--layer", "0", columns=150)
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("1 ") and "sink" in ln)
    assert [c.strip() for c in line.split("│")] == ["1", "sink", "41.7%", "41.7%", "33.8%", "50.0%",
                                                     "0, 7", "0, 7"]


# =========================================================================================
# Head classes
# =========================================================================================

def _arr(L_: int, idx: list[int]) -> np.ndarray:
    a = np.zeros(L_, dtype=bool)
    a[idx] = True
    return a


@pytest.mark.parametrize("density,R,C,want", [
    (0.6, [0, 1], [0], HeadClass.NEARLY_DENSE),  # density first, whatever R and C say
    (0.5, [], [], HeadClass.NEARLY_DENSE),  # the threshold is inclusive
    (0.1, [0], [], HeadClass.DIAGONAL_ONLY),  # offset 0 adds nothing to the guard
    (0.1, [0, 127], [127, 120], HeadClass.DIAGONAL_ONLY),  # edge patterns (< 16 cells) are ignored
    (0.1, [], [0, 3], HeadClass.SINK_ONLY),
    (0.1, [0], [0, 4], HeadClass.GLOBAL_COLUMNS),  # 4 = sink_width is already global
    (0.1, [1, 2, 63], [0], HeadClass.LOCAL_BAND),  # sinks are allowed in a band
    (0.1, [1, 64], [0], HeadClass.MIXED),  # 64 = local_width is long range
    (0.1, [1], [50], HeadClass.MIXED),  # band plus a global column
    (0.1, [112], [], HeadClass.MIXED),  # offset 112 has 16 cells: not an edge
])
def test_class_rules(density, R, C, want):
    assert classify_head(density, _arr(128, R), _arr(128, C)) is want


def test_class_rules_are_tunable():
    rules = ClassRules(sink_width=1, local_width=3, dense_at=0.9, edge_fraction=0.5)
    assert classify_head(0.6, _arr(128, [1]), _arr(128, []), rules) is HeadClass.LOCAL_BAND
    assert classify_head(0.1, _arr(128, [3]), _arr(128, []), rules) is HeadClass.MIXED
    assert classify_head(0.1, _arr(128, []), _arr(128, [1]), rules) is HeadClass.GLOBAL_COLUMNS
    assert classify_head(0.1, _arr(128, []), _arr(128, [65]), rules) is HeadClass.DIAGONAL_ONLY  # 63 < 64 cells
    assert classify_head(0.1, _arr(128, []), _arr(128, [65])) is HeadClass.GLOBAL_COLUMNS  # default rules


def test_ranges():
    assert ranges([]) == "none"
    assert ranges([5]) == "5"
    assert ranges(np.array([7, 0, 1, 2, 5, 8])) == "0-2, 5, 7-8"


# =========================================================================================
# Comparison
# =========================================================================================

def test_comparison_numbers(prof_a, prof_b):
    c = compare(prof_a, prof_b, 16)
    assert c.recipe_changes == {"tau": [0.3, 0.4]} and c.same_model
    # (1,1): A = diagonal + column 4 below 4 (11 cells), B = diagonal + column 3 below 3 (12):
    # they share the 8 diagonal cells, union 8 + 3 + 4 = 15.
    assert [d.iou for d in c.heads] == [1.0, 1.0, 1.0, 8 / 15]
    d = c.head(1, 1)
    assert (d.columns_gained, d.columns_lost, d.offsets_gained, d.offsets_lost) == ([3], [4], [], [])
    assert (d.class_a, d.class_b) == (HeadClass.GLOBAL_COLUMNS, HeadClass.SINK_ONLY)
    assert d.d_density_pcl == pytest.approx(1 / 36, rel=1e-12)
    assert d.d_density_length == pytest.approx(1 / 136, rel=1e-12)  # 36 vs 35 of 136
    assert c.heads_identical == 3
    assert c.iou_mean == pytest.approx(53 / 60, rel=1e-15) and c.iou_min == 8 / 15
    lay = c.layers[1]
    assert (lay.iou_mean, lay.iou_min, lay.columns_gained, lay.columns_lost, lay.offsets_gained) == (
        pytest.approx(23 / 30, rel=1e-15), 8 / 15, 1, 1, 0)
    assert lay.d_density_length == pytest.approx(1 / 272, rel=1e-12)
    assert c.layers[0].iou_min == 1.0 and c.layers[0].d_density_pcl == 0.0


def test_comparison_of_a_profile_with_itself_is_identical(prof_a):
    c = compare(prof_a, prof_a)
    assert c.iou_min == 1.0 and c.heads_identical == 4 and c.recipe_changes == {}


def test_comparison_cli_text_and_json(prof_a, prof_b):
    code, out, _ = run_cli("inspect", prof_a, prof_b, "--length", "16", columns=150)
    assert code == 0
    assert "recipe changes: tau 0.3 -> 0.4" in out
    assert "layer 1 head 1: IoU 0.533, global-columns -> sink-only" in out
    assert " pp;" in out and "in percentage points (pp)" in " ".join(out.split()) and "%;" not in out  # not a ratio
    code, out, _ = run_cli("inspect", prof_a, prof_b, "--json", columns=150)
    d = json.loads(out)
    assert code == 0 and d["kind"] == "dam-compare" and d["heads"][3]["columns_gained"] == [3]
    assert d["heads"][3]["class_b"] == "sink-only" and d["iou_min"] == 8 / 15


def test_comparison_of_different_shapes_names_both(prof_a, tmp_path):
    other = tmp_path / "three.safetensors"
    _profile([["diag", "sink", "diag"]], mass=None).save(other)
    code, out, err = run_cli("inspect", prof_a, str(other), columns=150)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: cannot compare profiles of different shapes")
    assert "2 layers x 2 heads, PCL 8" in err and "1 layers x 3 heads, PCL 8" in err


# =========================================================================================
# --check
# =========================================================================================

def test_check_valid(prof_a):
    code, out, err = run_cli("inspect", prof_a, "--check", columns=150)
    assert (code, out.strip(), err) == (0, f"ok {prof_a}", "")
    code, out, _ = run_cli("inspect", prof_a, "--check", "--json", columns=150)
    assert code == 0 and json.loads(out) == {"kind": "dam-check", "json_version": 1, "path": prof_a,
                                             "valid": True, "errors": [], "warnings": []}


def _save(tmp_path: Path, tm, R, C, stats=None, **kw) -> str:
    path = tmp_path / "x.safetensors"
    Profile.from_masks(tm, R, C, stats=stats, **kw).save(path, force=True)
    return str(path)


def test_check_catches_internal_inconsistency(tmp_path):
    tm = _head_masks("sink")[None, None]
    R, C = masks.match_patterns(tm, 0.8)
    bad_r = R.clone()
    bad_r[0, 0, 3] = True  # diagonal 3 holds 1 of 5 cells: below mu
    path = _save(tmp_path, tm, bad_r, C)
    code, out, err = run_cli("inspect", path, "--check", columns=150)
    assert code == 1 and err.count("\n") == 1
    assert "layer 0 head 0 matches offset 3, whose score is below mu = 0.8" in err
    assert out.startswith("invalid")

    missing = C.clone()
    missing[0, 0, 0] = False  # column 0 is full but no longer matched: a faithful profile must match it
    path = _save(tmp_path, tm, R, missing)
    r = check(path)
    assert not r.valid and r.errors == ["layer 0 head 0: column 0 reaches mu = 0.8 but is not matched"]
    path = _save(tmp_path, tm, R, missing, variant="beyond")  # a non-faithful variant may drop it
    r = check(path)
    assert r.valid and r.warnings == ["layer 0 head 0: column 0 reaches mu = 0.8 but is not matched "
                                      "(1 such in this layer)"]

    stats = default_stats(tm, R, C)
    stats["stats.true_density"] = stats["stats.true_density"] + 0.01
    path = _save(tmp_path, tm, R, C, stats=stats)
    r = check(path)
    assert r.errors == ["stats.true_density of layer 0 head 0 does not match its true mask"]


def test_check_honours_min_support(tmp_path):
    tm = _head_masks("sink")[None, None]
    R, C = masks.match_patterns(tm, 0.8, min_support=2)  # drops offset 7 and column 7 (1 cell each)
    assert check(_save(tmp_path, tm, R, C, min_support=2)).valid
    assert not check(_save(tmp_path, tm, R, C)).valid  # faithful, min_support 1: 7s are missing


def test_check_catches_an_edited_model_header(tmp_path):
    """A model field changed in the header (head_dim 64 -> 65) no longer hashes to config_sha256: --check says so,
    where it said ok and `dam generate` then refused the profile for the model it was made for."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = SHIPPED_PROFILE
    with safe_open(src, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert check(src).valid
    model = json.loads(meta["dam.model"])
    model["head_dim"] = 65
    meta["dam.model"] = json.dumps(model)
    save_file(tensors, tmp_path / "edited.safetensors", metadata=meta)
    r = check(tmp_path / "edited.safetensors")
    assert not r.valid and r.errors == ["dam.model's fields do not hash to its config_sha256: the header was edited "
                                        "or damaged (restore a good copy or re-create it with `dam profile`)"]


def test_check_invalid_file_json(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a profile at all")
    code, out, err = run_cli("inspect", str(bad), "--check", "--json", columns=150)
    d = json.loads(out)
    assert code == 1 and d["valid"] is False and "not a valid DAM profile" in d["errors"][0]
    assert err.count("\n") == 1 and err.startswith("error: ")


# =========================================================================================
# Bad input: one line on stderr, non-zero exit
# =========================================================================================

def _not_dam(tmp_path: Path) -> str:
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(path))
    return str(path)


def _truncated(tmp_path: Path) -> str:
    good = tmp_path / "good.safetensors"
    _profile(KINDS_A).save(good)
    path = tmp_path / "trunc.safetensors"
    path.write_bytes(good.read_bytes()[:-40])
    return str(path)


def _schema3(tmp_path: Path) -> str:
    """A profile whose header claims a schema newer than this dam reads (same header length)."""
    good = tmp_path / "good3.safetensors"
    _profile(KINDS_A).save(good)
    data = good.read_bytes()
    assert data.count(b'"dam.schema":"2"') == 1
    path = tmp_path / "s3.safetensors"
    path.write_bytes(data.replace(b'"dam.schema":"2"', b'"dam.schema":"3"'))
    return str(path)


@pytest.mark.parametrize("written", ['" 2"', '"02"', '"+2"', '"\\u0662"', '"2\\n"', '"2.0"'])
def test_a_schema_written_otherwise_than_dam_writes_it_is_refused(tmp_path, written):
    """`int()` read " 2", "02", "+2", an Arabic-Indic two or "2\\n" as schema 2: only "2" is what dam writes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    _profile(KINDS_A).save(good)
    with safe_open(good, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["dam.schema"] = json.loads(written)
    save_file(tensors, tmp_path / "odd.safetensors", metadata=meta)
    r = check(tmp_path / "odd.safetensors")
    assert not r.valid and "dam.schema is missing or not an integer as dam writes it" in r.errors[0], r.errors


def _text(tmp_path: Path) -> str:
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a safetensors file\n")
    return str(path)


@pytest.mark.parametrize("make,extra,code,needle", [
    (_text, [], 1, "is not a valid DAM profile: header length"),
    (_truncated, [], 1, "runs past the end of the file"),
    (_not_dam, [], 1, "a safetensors file, but not a DAM profile"),
    (_schema3, [], 1, "has profile schema 3, but this dam"),
    (lambda t: str(t / "missing.safetensors"), [], 1, "does not exist"),
    (None, ["--layer", "2"], 2, "--layer 2 is out of range: this profile has layers 0..1"),
    (None, ["--layer", "0", "--head", "2"], 2, "--head 2 is out of range: this profile has heads 0..1"),
    (None, ["--layer", "-1"], 2, "--layer -1 is out of range"),
    (None, ["--head", "0"], 2, "--head needs --layer"),
    (None, ["--length", "0"], 2, "--length must be at least 1"),
    (None, ["--check", "--png", "x.png"], 2, "--check validates only"),
])
def test_bad_input_gives_one_line(make, extra, code, needle, tmp_path, prof_a):
    path = make(tmp_path) if make else prof_a
    got, out, err = run_cli("inspect", path, *extra, columns=150)
    assert got == code, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_bad_selection_fails_before_loading_tensors(tmp_path):
    # The header is valid but the tensors are cut off: a bad --layer is reported first (header only).
    code, _, err = run_cli("inspect", _truncated(tmp_path), "--layer", "9", columns=150)
    assert code == 2 and "--layer 9 is out of range" in err


# =========================================================================================
# PNG
# =========================================================================================

def test_png_is_valid_and_of_the_expected_size(prof_a, tmp_path):
    from PIL import Image

    from dam_cli.inspection.png import png_size

    out_png = tmp_path / "p.png"
    code, out, err = run_cli("inspect", prof_a, "--png", str(out_png), "--json", columns=150)
    assert code == 0 and json.loads(out)["kind"] == "dam-inspect"  # stdout stays pure JSON
    assert f"wrote {out_png} (1000 x 445 px)" in err
    with Image.open(out_png) as im:
        im.verify()  # a complete, uncorrupted PNG
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.size == (1000, 445) == png_size(2, 2)
        assert len(im.getcolors(1 << 20)) > 20  # a picture, not a blank canvas
    assert png_size(30, 9) == (1700, 1145)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    code, _, err = run_cli("inspect", prof_a, "--png", str(out_png), columns=150)
    assert code == 2 and "already exists: pass --force to replace it, or choose another --png" in err
    before = out_png.read_bytes()
    code, _, err = run_cli("inspect", prof_a, "--png", str(out_png), "--force", "--length", "9", columns=150)
    assert code == 0 and out_png.read_bytes() != before  # --force replaces it (the title's densities changed)
    code, _, err = run_cli("inspect", prof_a, "--png", str(tmp_path / "no" / "p.png"), columns=150)
    assert code == 2 and "the folder of --png" in err and "does not exist" in err and err.count("\n") == 1


def test_help_is_instant_and_lists_examples():
    code, out, _ = run_cli("inspect", "--help", columns=150)
    assert code == 0 and "dam inspect P.safetensors --png profile.png" in out and "--check" in out
    import subprocess

    probe = ("import sys, dam_cli.cli.app; bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; "
             "print(bad)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"  # importing the CLI pulls in neither torch nor matplotlib


def test_fraction_helpers_match_hand_values():
    # Guard against a silent change of the percentage formatting used in the table test above.
    from dam_cli.inspection.render import pct

    assert pct(float(Fraction(23, 72))) == "31.9%" and pct(0.0004) == "0.040%" and pct(None) == "n/a"


def test_summary_check_and_compare_never_import_torch():
    """`dam inspect P` stays fast because its table needs numpy only (docs/benchmarks.md)."""
    import subprocess
    import sys

    from helpers import SHIPPED_PROFILE as shipped
    code = ("import sys; from dam_cli.inspection.summary import summarize; "
            "from dam_cli.inspection.check import check; from dam_cli.inspection.compare import compare; "
            f"p = {shipped!r}; summarize(p); assert check(p).valid; compare(p, p); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_run_time_options_read_as_the_rule_they_apply():
    """`dam inspect`'s run-time row: a top-k rule as its budgets, the mass rule as its share and caps."""
    from dam_cli.inspection.render import _runtime_parts

    topk = {"dynamic": {"topk": 9, "block": 64, "tail_topk": 32, "score": "mean", "tail_mass": 0.9}}
    assert _runtime_parts(topk) == ["dynamic top-9 x 64", "tail top-32", "tail mass 0.9", "score mean"]
    mass = {"dynamic": {"topk": 32, "block": 64, "tail_topk": 32, "score": "antidiag", "tail_mass": 0.9}}
    assert _runtime_parts(mass) == ["dynamic blocks of 64 by attention mass 0.9",
                                    "antidiagonal estimate, at most 32", "exact in the tail, at most 32"]
    mass["dynamic"]["score"] = "antisum"
    assert _runtime_parts(mass)[1] == "summed-antidiagonal estimate, at most 32"
    both = {"dynamic": {"topk": 32, "block": 64, "tail_topk": 64, "score": "antisum", "tail_mass": 1.0, "mass": 0.9}}
    assert _runtime_parts(both) == ["dynamic blocks of 64 by attention mass 0.9", "summed-antidiagonal estimate, "
                                    "at most 32", "exact in the tail (1.0 of it), at most 64"]
    assert _runtime_parts(None)[0].startswith("none")
