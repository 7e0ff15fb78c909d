"""Block layouts equal the block-reduction of the exact Stage-2 mask (torch.equal, no tolerance)."""

from __future__ import annotations

import os

import pytest
import torch
from dam_kernels.layout import build_layout, layout_for
from helpers import SHIPPED_PROFILE as SMOLLM2  # noqa: E402
from helpers import all_allowed_profile, guard_only_profile, random_profile

from dam_cli.artifact.profile import Profile, load_profile

# "all": every causal pair (M full, every offset matched); "diag": nothing but the guard.
SPECIAL_PROFILES = {"all": all_allowed_profile, "diag": guard_only_profile}


def expected_blocks(profile: Profile, layer: int, S: int, bm: int, bn: int):
    """(kept, full) by brute force: any over the S x S mask; all over the padded block grid."""
    m = profile.mask(layer, S)
    H = m.shape[0]
    nQ, nK = -(-S // bm), -(-S // bn)
    padded = torch.zeros(H, nQ * bm, nK * bn, dtype=torch.bool)
    padded[:, :S, :S] = m
    kept = padded.view(H, nQ, bm, nK, bn).any(4).any(2)
    inf = profile.mask_rows(layer, torch.arange(nQ * bm), nK * bn)
    full = inf.view(H, nQ, bm, nK, bn).all(4).all(2)
    return kept, full


def assert_layout_exact(profile, layer, S, bm, bn):
    lay = build_layout(profile.layer_true_mask(layer), profile.offsets[layer], profile.columns[layer], S, bm, bn)
    kept, full = lay.to_dense()
    want_kept, want_full = expected_blocks(profile, layer, S, bm, bn)
    where = f"S={S} bm={bm} bn={bn}"
    assert torch.equal(kept, want_kept), f"{where}: kept differs at {(kept != want_kept).nonzero()[:5].tolist()}"
    assert torch.equal(full, want_full), f"{where}: full differs at {(full != want_full).nonzero()[:5].tolist()}"
    # Index lists: ascending, partial and full disjoint, padding zero.
    for num, idx in ((lay.kv_num_blocks, lay.kv_indices), (lay.full_kv_num_blocks, lay.full_kv_indices)):
        valid = torch.arange(idx.shape[-1]) < num[..., None]
        assert torch.all(torch.where(valid, idx, 0)[..., 1:] >= torch.where(valid, idx, 0)[..., :-1] * valid[..., 1:])
        assert torch.all(idx[~valid] == 0)
    return lay


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("L", [16, 24])
def test_random_profiles_exact(seed, L):
    dens = [(0.3, 0.15, 0.15), (0.9, 0.6, 0.5), (1.0, 0.95, 0.9), (0.05, 0.02, 0.02)][seed]
    prof = random_profile(heads=3, L=L, p_m=dens[0], p_r=dens[1], p_c=dens[2], seed=seed)
    for S in (1, 5, L - 1, L, L + 3, 2 * L + 5, 3 * L, 5 * L + 7):
        for bm, bn in ((8, 8), (16, 8), (8, 16), (16, 16), (32, 16)):
            assert_layout_exact(prof, 0, S, bm, bn)


@pytest.mark.parametrize("kind", ["all", "diag"])
def test_special_profiles(kind):
    prof = SPECIAL_PROFILES[kind](heads=2)
    for S in (7, 16, 45):
        lay = assert_layout_exact(prof, 0, S, 16, 8)
        if kind == "all":
            assert lay.kept_fraction() == 1.0
        else:  # only diagonal blocks: one or two key blocks per query block
            assert int(lay.kv_num_blocks.max()) <= 2 and int(lay.full_kv_num_blocks.max()) == 0


def test_cached_layout_matches_and_is_reused():
    prof = random_profile(n_layers=2, heads=3, seed=5)
    a = layout_for(prof, 1, 50, 16, 16)
    assert layout_for(prof, 1, 50, 16, 16) is a
    kept, _ = a.to_dense()
    assert torch.equal(kept, expected_blocks(prof, 1, 50, 16, 16)[0])
    other = random_profile(n_layers=2, heads=3, seed=6)
    b = layout_for(other, 1, 50, 16, 16)
    assert torch.equal(b.to_dense()[0], expected_blocks(other, 1, 50, 16, 16)[0])


def test_long_length_never_builds_dense_and_stays_small():
    prof = random_profile(heads=4, L=64, p_m=0.1, p_r=0.05, p_c=0.05, seed=3)
    lay = build_layout(prof.layer_true_mask(0), prof.offsets[0], prof.columns[0], 1 << 16, 64, 32)
    # Beyond L a query block reaches at most the column blocks and a band of about L keys.
    assert lay.kv_indices.shape[-1] + lay.full_kv_indices.shape[-1] <= 2 * (64 // 32 + (64 + 64) // 32 + 2)
    assert 0 < lay.kept_fraction() < 0.01


@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="real SmolLM2 profile not built yet")
def test_real_profile_exact():
    prof = load_profile(SMOLLM2)
    L = prof.pcl
    for layer in (0, prof.n_layers - 1):
        for S in (L - 5, L + 77):
            assert_layout_exact(prof, layer, S, 64, 32)


@pytest.mark.parametrize("seed", range(3))
def test_kernel_word_tables_decode_to_the_stage2_mask(seed):
    """The kernels' 64-bit words give back stage2 exactly: M rows below L, offsets beyond."""
    from dam_kernels.word_tables import kernel_tables

    L = [16, 70, 130][seed]
    prof = random_profile(heads=2, L=L, p_m=0.4, p_r=0.3, p_c=0.2, seed=seed)
    tab = kernel_tables(prof.layer_true_mask(0), prof.offsets[0], prof.columns[0])
    S = 3 * L + 5
    want = prof.mask(0, S)
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    bit = lambda w, s: ((w >> s) & 1).bool()  # noqa: E731
    below = i < L
    mw = tab.mask_words[:, i.clamp(max=L - 1), (j // 64).clamp(max=tab.mask_words.shape[-1] - 1)]
    got_below = bit(mw, j % 64) & (j < L)
    # Beyond L: keys in 64-aligned words, e = i - k0 indexes the offset word, bit t = j - k0.
    k0 = (j // 64) * 64
    e = i - k0
    ow = tab.offset_words[:, e.clamp(0, L + 63)]
    got_beyond = bit(ow, j - k0) & (e >= 0) & (e < L + 64)
    got_beyond |= tab.columns[:, j.clamp(max=L - 1)].bool() & (j < L)
    got = torch.where(below, got_below, got_beyond)
    assert torch.equal(got, want)


@pytest.mark.parametrize("L", [8, 40, 64, 70, 130])
def test_words_read_from_the_packed_mask_equal_the_unpacked_ones(L):
    """`device_masks` reads the profile's packed bytes as words (cut to the causal part, guard set): the same
    tables as `kernel_tables` from the unpacked bools, also for bits above the diagonal (which it must drop)."""
    from dam_kernels.layout import device_masks
    from dam_kernels.word_tables import kernel_tables, mask_words_from_packed

    from dam_cli.artifact.profile import pack_bits

    prof = random_profile(heads=3, L=L, p_m=0.4, p_r=0.3, p_c=0.2, seed=L)
    want = kernel_tables(prof.layer_true_mask(0), prof.offsets[0], prof.columns[0])
    got = device_masks(prof, 0, "cpu")
    assert got.pcl == want.pcl == L
    for name in ("mask_words", "offset_words", "columns"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    noisy = torch.rand(3, L, L, generator=torch.Generator().manual_seed(L)) < 0.5  # not causal
    assert torch.equal(mask_words_from_packed(pack_bits(noisy), L), kernel_tables(noisy, prof.offsets[0],
                                                                                  prof.columns[0]).mask_words)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_without_a_sort_equals_the_sorted_compaction(seed):
    from dam_kernels.layout import _compact

    g = torch.Generator().manual_seed(seed)
    flags = torch.rand(3, 7, 40, generator=g) < 0.3 * (seed + 1) / 3
    cand = torch.sort(torch.randperm(100, generator=g)[:40]).values.expand(7, 40)  # ascending, with gaps
    num, idx = _compact(flags, cand)
    num_s, idx_s = _compact(flags, cand, ascending=False)
    assert torch.equal(num, num_s) and torch.equal(idx, idx_s)
    for h in range(3):
        for r in range(7):
            assert idx[h, r, : num[h, r]].tolist() == cand[r][flags[h, r]].tolist()
            assert not idx[h, r, num[h, r]:].any()
