"""The pure DAM math on hand-worked cases, compared exactly (torch.equal, no tolerances)."""

from __future__ import annotations

import math

import pytest
import torch

from dam_cli import masks


def test_boxcox_hand_values():
    x = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    assert torch.equal(masks.boxcox(x, 0.5), torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.equal(masks.boxcox(x, 0.0), torch.log(x))
    assert masks.boxcox_floor(0.5, 1e-10) == pytest.approx(-1.99998, abs=1e-12)
    assert masks.boxcox_floor(0.0, 1e-10) == math.log(1e-10)


def test_counts_and_mean_hand_worked():
    # Two samples of lengths 3 and 2 at L = 3: positions 0, 1 seen twice, position 2 once.
    cnt = masks.position_counts([3, 2], 3)
    assert torch.equal(cnt, torch.tensor([2, 2, 1]))
    C = masks.pair_counts(cnt)
    assert torch.equal(C, torch.tensor([[2, 2, 1], [2, 2, 1], [1, 1, 1]], dtype=torch.float64))
    S = torch.tensor([[2.0, 0, 0], [1.0, 1.0, 0], [0.5, 0.25, 0.25]])
    abar = masks.mean_attention(S, cnt, eps=0.0)
    assert torch.equal(abar, torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0.25, 0.25]], dtype=torch.float64))


def test_true_mask_threshold_hand_worked():
    # lam 0.5, tau 0.3: Atil = 2 sqrt(x) - 2e-5 >= 0.3  <=>  x >= 0.022503 (spec's sanity check).
    abar = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.9, 0.08, 0.02]], dtype=torch.float64)
    m = masks.true_mask(abar, lam=0.5, tau=0.3)
    assert torch.equal(m, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    # 0.0225 sits just under the cut (0.022503), 0.02251 just over.
    edge = torch.tensor([[1.0, 0.0], [0.0225, 0.02251]], dtype=torch.float64)
    assert torch.equal(masks.true_mask(edge, 0.5, 0.3), torch.tensor([[True, False], [False, True]]))
    # lam = 0: ln-based, shift by ln(eps); threshold tau keeps x >= eps * e^tau.
    tiny = torch.tensor([[1.0, 0.0], [1e-10 * math.exp(0.31), 1e-10 * math.exp(0.29)]], dtype=torch.float64)
    assert torch.equal(masks.true_mask(tiny, 0.0, 0.3), torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError):
        masks.true_mask(abar, 0.5, 0.0)


# The 4x4 mask used below. Diagonal r=3 has ONE cell (3,0): a short tail diagonal that matches
# whenever the sink column is kept (the artefact the min-support option removes).
M4 = torch.tensor([[1, 0, 0, 0],
                   [1, 1, 0, 0],
                   [1, 0, 1, 0],
                   [1, 0, 0, 0]], dtype=torch.bool)


def test_pattern_scores_hand_worked():
    d, c = masks.pattern_scores(M4)
    assert torch.equal(masks.diagonal_counts(M4), torch.tensor([3, 1, 1, 1]))
    assert torch.equal(masks.column_counts(M4), torch.tensor([4, 1, 1, 0]))
    assert torch.equal(d, torch.tensor([3 / 4, 1 / 3, 1 / 2, 1.0], dtype=torch.float64))
    assert torch.equal(c, torch.tensor([1.0, 1 / 3, 1 / 2, 0.0], dtype=torch.float64))
    R, C = masks.match_patterns(M4, mu=0.8)
    assert torch.equal(R, torch.tensor([False, False, False, True]))
    assert torch.equal(C, torch.tensor([True, False, False, False]))
    R, C = masks.match_patterns(M4, mu=0.75)
    assert torch.equal(R, torch.tensor([True, False, False, True]))
    R, C = masks.match_patterns(M4, mu=0.8, min_support=2)  # beyond-paper option
    assert torch.equal(R, torch.zeros(4, dtype=torch.bool))
    assert torch.equal(C, torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError):
        masks.match_patterns(M4, mu=1.5)


def test_pattern_scores_batched_equal_per_head():
    g = torch.Generator().manual_seed(1)
    m = torch.tril(torch.rand(2, 3, 9, 9, generator=g) < 0.4)
    d, c = masks.pattern_scores(m)
    for a in range(2):
        for b in range(3):
            d1, c1 = masks.pattern_scores(m[a, b])
            assert torch.equal(d[a, b], d1) and torch.equal(c[a, b], c1)


def test_stage2_inside_and_beyond_L_hand_worked():
    R = torch.tensor([False, False, False, True])
    C = torch.tensor([True, False, False, False])
    got = masks.stage2_mask(M4, R, C, 7)
    want = torch.zeros(7, 7, dtype=torch.bool)
    allowed = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 3],  # inside L: M4, plus the guard at (3, 3)
               4: [0, 1, 4], 5: [0, 2, 5], 6: [0, 3, 6]}  # beyond: column 0, offset 3, guard
    for i, js in allowed.items():
        want[i, js] = True
    assert torch.equal(got, want)
    assert masks.density(M4, R, C, 7).item() == 16 / 28
    # Shorter than L: just the true mask plus the guard.
    assert torch.equal(masks.stage2_mask(M4, R, C, 3), want[:3, :3])


def test_stage2_guard_fills_empty_rows():
    empty = torch.zeros(4, 4, dtype=torch.bool)
    none = torch.zeros(4, dtype=torch.bool)
    got = masks.stage2_mask(empty, none, none, 6)
    assert torch.equal(got, torch.eye(6, dtype=torch.bool))


def test_stage2_offsets_and_columns_overlap_counted_once():
    L = 4
    M = torch.tril(torch.ones(L, L, dtype=torch.bool))
    R = torch.tensor([False, False, True, False])
    C = torch.tensor([False, False, True, False])
    m = masks.stage2_mask(M, R, C, 6)
    assert m[4].nonzero().flatten().tolist() == [2, 4]  # offset 2 and column 2 are the same key
    assert m[5].nonzero().flatten().tolist() == [2, 3, 5]
    assert torch.equal(masks.allowed_per_row(M, R, C, 6), m.sum(-1))


@pytest.mark.parametrize("S", [1, 5, 8, 9, 15, 16, 17, 40])
def test_allowed_per_row_matches_dense(S):
    g = torch.Generator().manual_seed(S)
    L = 8
    M = torch.tril(torch.rand(3, L, L, generator=g) < 0.3)
    R = torch.rand(3, L, generator=g) < 0.3
    C = torch.rand(3, L, generator=g) < 0.3
    dense = masks.stage2_mask(M, R, C, S)
    assert torch.equal(masks.allowed_per_row(M, R, C, S), dense.sum(-1))
    assert torch.equal(masks.density(M, R, C, S), dense.sum((-1, -2)).double() / (S * (S + 1) / 2))
    assert not torch.triu(dense, 1).any()  # causal


def test_allowed_per_row_many_offsets_path():
    L = 80  # more than 64 distinct offsets switches _convolve to the conv1d path
    M = torch.tril(torch.ones(L, L, dtype=torch.bool))
    R = torch.ones(L, dtype=torch.bool)
    C = torch.zeros(L, dtype=torch.bool)
    C[::7] = True
    dense = masks.stage2_mask(M, R, C, 2 * L + 5)
    assert torch.equal(masks.allowed_per_row(M, R, C, 2 * L + 5), dense.sum(-1))


@pytest.mark.parametrize("top", [1, 3, 1 << 20])  # sums within float32's exact integers, and past them
def test_convolve_is_exact_on_its_conv1d_path(top):
    g = torch.Generator().manual_seed(top)
    a = torch.randint(0, top + 1, (2, 3, 100), generator=g)
    b = torch.randint(0, 2, (2, 3, 100), generator=g)
    want = torch.zeros(2, 3, 199, dtype=torch.int64)
    for r in range(100):  # the loop the conv1d path stands in for
        want[..., r: r + 100] += a * b[..., r: r + 1]
    assert len(torch.nonzero(b.reshape(-1, 100).sum(0)).flatten()) > 64  # the conv1d path, not the loop
    assert torch.equal(masks._convolve(a, b), want)


def test_derive_head_end_to_end():
    # One sample of length 3 whose attention is exactly the hand case above.
    S = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.9, 0.08, 0.02]])
    cnt = masks.position_counts([3], 3)
    m, R, C, kept = masks.derive_head(S, cnt, lam=0.5, tau=0.3, mu=0.8)
    assert torch.equal(m, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    # diag r=0: cells (0,0),(1,1),(2,2) -> 2/3; r=1: (1,0),(2,1) -> 2/2; r=2: (2,0) -> 1/1.
    assert torch.equal(R, torch.tensor([False, True, True]))
    # columns: c=0 -> 3/3, c=1 -> (1,1),(2,1) -> 2/2, c=2 -> 0/1.
    assert torch.equal(C, torch.tensor([True, True, False]))
    assert kept == pytest.approx((1.0 + 1.0 + 0.98) / 3, abs=1e-7)


# ---- beyond-paper options (issue 8) -------------------------------------------------------

def test_full_heads_allow_every_causal_pair():
    L, S = 4, 9
    M = torch.zeros(2, L, L, dtype=torch.bool)
    none = torch.zeros(2, L, dtype=torch.bool)
    full = torch.tensor([True, False])
    m = masks.stage2_mask(M, none, none, S, full)
    assert torch.equal(m[0], torch.tril(torch.ones(S, S, dtype=torch.bool)))
    assert torch.equal(m[1], torch.eye(S, dtype=torch.bool))
    assert torch.equal(masks.allowed_per_row(M, none, none, S, full), m.sum(-1))
    assert masks.density(M, none, none, S, full).tolist() == [1.0, S / (S * (S + 1) / 2)]


def test_select_patterns_by_mass_hand_worked():
    # Rows of a 4x4 mean attention: a sink column (0) and the previous token (offset 1).
    a = torch.tensor([[1.0, 0, 0, 0],
                      [0.5, 0.5, 0, 0],
                      [0.6, 0.3, 0.1, 0],
                      [0.5, 0.1, 0.35, 0.05]], dtype=torch.float64)
    # Total 4.0; the guard covers the diagonal (1 + 0.5 + 0.1 + 0.05 = 1.65).
    # Uncovered column 0 holds 1.6; diagonal 1 holds 0.5 + 0.3 + 0.35 = 1.15.
    R, C = masks.select_patterns_by_mass(a, 0.5)  # 1.65 / 4 = 0.41 < 0.5: one pick, column 0
    assert R.nonzero().flatten().tolist() == [] and C.nonzero().flatten().tolist() == [0]
    R, C = masks.select_patterns_by_mass(a, 0.9)  # after column 0: 3.25 / 4; then diagonal 1 (0.3+0.35)
    assert R.nonzero().flatten().tolist() == [1] and C.nonzero().flatten().tolist() == [0]
    assert masks.pattern_mass_kept(a, R, C).item() == pytest.approx(3.9 / 4)
    R, C = masks.select_patterns_by_mass(a, 0.4)  # the guard alone covers 41%
    assert not R.any() and not C.any()


def test_select_patterns_by_mass_skips_patterns_under_min_support():
    """A late column holding most of the mass has fewer cells than min_support: never taken, as match_patterns
    ignores it; the next heaviest long patterns are taken instead."""
    L = 8
    a = torch.tril(torch.full((L, L), 0.01, dtype=torch.float64))
    a[6:, 5] = 5.0  # column 5: 3 cells (rows 5 to 7), the heaviest pattern
    R, C = masks.select_patterns_by_mass(a, 0.9)
    assert C[5]  # without a support rule it is taken
    R, C = masks.select_patterns_by_mass(a, 0.9, min_support=4)
    assert not C[5:].any() and not R[5:].any() and (R.any() or C.any())
    assert ((masks.pattern_sizes(L) >= 4) | ~(R | C)).all()


def test_select_patterns_by_mass_diffuse_head_gets_a_window():
    L = 128
    a = torch.tril(torch.ones(L, L, dtype=torch.float64))
    a = a / a.sum(-1, keepdim=True)  # uniform causal attention: rows past 44 have no pair above tau
    m = masks.true_mask(a, 0.5, 0.3)
    R_faithful, C_faithful = masks.match_patterns(m, 0.8)
    R, C = masks.select_patterns_by_mass(a, 0.8)
    assert not R_faithful.any() and not C_faithful.any()  # the faithful rule: nothing beyond L
    assert R.any() or C.any()
    assert masks.pattern_mass_kept(a, R, C).item() >= 0.8


def _gather_oracle(true_mask, offsets, columns, rows, n_keys):
    """An independent Stage-2 implementation: gather every (row, key) pair's rule."""
    L = true_mask.shape[-1]
    i = rows[:, None]
    j = torch.arange(n_keys)[None, :]
    inside = (i < L) & (j < L)
    rel = (i - j).clamp(0, L - 1)
    pat = offsets[..., rel] & ((i - j) < L) | (columns[..., j.clamp(max=L - 1).expand(len(rows), -1)] & (j < L))
    tm = true_mask[..., i.clamp(max=L - 1).expand(-1, n_keys), j.clamp(max=L - 1).expand(len(rows), -1)]
    return (torch.where(inside, tm, pat) & (j <= i)) | (i == j)


@pytest.mark.parametrize("L,r0,r1,K", [(16, 0, 16, 16), (16, 10, 40, 40), (16, 30, 31, 50), (8, 0, 64, 64),
                                       (12, 5, 37, 37)])
def test_stage2_rows_equals_gather_oracle(L, r0, r1, K):
    g = torch.Generator().manual_seed(L + K)
    M = torch.tril(torch.rand(2, 3, L, L, generator=g) < 0.3)
    R = torch.rand(2, 3, L, generator=g) < 0.2
    C = torch.rand(2, 3, L, generator=g) < 0.2
    rows = torch.arange(r0, r1)
    assert torch.equal(masks.stage2_rows(M, R, C, rows, K), _gather_oracle(M, R, C, rows, K))


def test_stage2_rows_of_a_key_range_equal_the_slice_of_all_keys():
    # The reference builds mask rows over the keys a row beyond L can reach only (key_start):
    # every range must be the matching slice of the full rows, retrieval heads included.
    from dam_cli.masks import stage2_rows

    g = torch.Generator().manual_seed(3)
    H, L, S = 5, 12, 60
    tm = (torch.rand(H, L, L, generator=g) < 0.4).tril()
    off = torch.rand(H, L, generator=g) < 0.3
    col = torch.rand(H, L, generator=g) < 0.3
    full = torch.tensor([False, True, False, False, False])
    rows = torch.tensor([0, 3, 11, 12, 20, 33, 47, 59])
    for fh in (None, full):
        every = stage2_rows(tm, off, col, rows, S, fh)
        for k0, n in [(0, 12), (5, 9), (12, 30), (30, 30), (40, 20), (59, 1), (3, 57)]:
            assert torch.equal(stage2_rows(tm, off, col, rows, n, fh, key_start=k0), every[..., k0:k0 + n]), (k0, n)


def test_profile_mask_queries_refuse_values_that_are_not_positions():
    """`Profile.mask`, `mask_rows` and `density` with a fraction, NaN, a string, None, a negative or an absurd
    count: one DamError naming the argument (they were TypeError, IndexError or an allocation error)."""
    from helpers import all_allowed_profile

    from dam_cli.artifact.profile import MAX_POSITIONS
    from dam_cli.errors import DamError

    p = all_allowed_profile(n_layers=2, heads=2, L=16)
    for bad in (1.5, float("nan"), "16", None, True, 0, MAX_POSITIONS + 1, 10**12):
        with pytest.raises(DamError, match=r"length must be a whole number from 1 to 16,777,216 \(positions\)"):
            p.density(bad)
        with pytest.raises(DamError, match="length must be a whole number"):
            p.mask(0, bad)
    for bad in (0.5, "0", None):
        with pytest.raises(DamError, match="layer must be an int"):
            p.mask(bad, 16)
    for bad in (2, -1):
        with pytest.raises(DamError, match="layer .* is out of range"):
            p.mask(bad, 16)
    rows = torch.arange(4)
    with pytest.raises(DamError, match="n_keys must be a whole number from 0"):
        p.mask_rows(0, rows, -1)
    with pytest.raises(DamError, match="key_start must be a whole number from 0"):
        p.mask_rows(0, rows, 8, key_start=-2)
    for bad in ([1, 2], torch.tensor([1.5]), torch.tensor([True])):  # once an AttributeError, or rounded down
        with pytest.raises(DamError, match="rows must be an integer tensor of row positions"):
            p.mask_rows(0, bad, 8)
    with pytest.raises(DamError, match="rows must be positions >= 0, got -1"):  # once an all-False row
        p.mask_rows(0, torch.tensor([3, -1]), 8)
    assert p.mask(0, 16).shape == (2, 16, 16) and p.mask_rows(0, rows, 8).shape == (2, 4, 8)
    assert p.density(16).shape == (2, 2)
