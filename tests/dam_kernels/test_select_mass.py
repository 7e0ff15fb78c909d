"""The exact-mass selection kernels (`dam_kernels.select_mass`) against float64 and their PyTorch reference,
`select_blocks_one(..., tail_mass=gamma)`, and a graph-loop decode step through `_triton_attention` against the
reference attention. The kernels sum in another order than the reference, so the selections are compared on
rows whose choice no rounding decides (checked in float64 here), and exact ties come from identical key blocks.
CPU: Triton in the interpreter; with TRITON_INTERPRET=0 on a GPU, compiled."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.dynamic import select_blocks_one  # noqa: E402
from dam_kernels.select_mass import block_score_stats, select_by_mass, select_extra_mass  # noqa: E402
from dam_kernels.selection import DynamicSelection  # noqa: E402
from helpers import random_profile, require_kernel_device  # noqa: E402

DEVICE = require_kernel_device()
NEG_INF = float("-inf")


def _counted(pos: int, n_keys: int, window: int | None) -> torch.Tensor:
    j = torch.arange(n_keys)
    return (j <= pos) & (pos - j < window if window is not None else True)


def _stats_oracle(q, k, pos, block, scale, window):
    """float64 per-block maximum of `scale q.k_j` over the counted keys and sum of `exp(s_j - max)`: [B, H, n_k]."""
    B, H, _, D = q.shape
    H_kv, n_keys = k.shape[1], k.shape[2]
    n_k = -(-n_keys // block)
    kk = torch.nan_to_num(k.double().cpu(), nan=0.0).repeat_interleave(H // H_kv, 1)
    s = (q.double().cpu() @ kk.transpose(-1, -2)).squeeze(2) * scale  # [B, H, n_keys]
    s = s.masked_fill(~_counted(pos, n_keys, window), NEG_INF)
    s = torch.nn.functional.pad(s, (0, n_k * block - n_keys), value=NEG_INF).reshape(B, H, n_k, block)
    bmax = s.amax(-1)
    bsum = torch.exp(s - torch.where(bmax == NEG_INF, 0.0, bmax)[..., None]).sum(-1)
    return bmax, bsum


def _mass_oracle(q, k, pos, block, scale, window):
    """float64 block masses of the row's softmax: [B, H, n_k]."""
    bmax, bsum = _stats_oracle(q, k, pos, block, scale, window)
    w = bsum * torch.exp(bmax - bmax.amax(-1, keepdim=True))
    return w / w.sum(-1, keepdim=True)


def _undecided_by_rounding(mass, qb, gamma, rel=1e-4, exact_ties=False):
    """bool [B, H]: rows where a float rounding could change `mass_select`'s choice (float64 masses): two
    candidate masses that matter within `rel` of each other (`exact_ties`: unless equal, as masses computed from
    identical inputs are in every order), or a left-out mass within `rel` of the limit."""
    cand = mass[..., :qb]
    srt = cand.sort(-1, descending=True).values
    left = srt.flip(-1).cumsum(-1).flip(-1)
    limit = (1 - gamma) * (mass[..., qb : qb + 1] + cand.sum(-1, keepdim=True))
    near_limit = ((left - limit).abs() <= rel * limit.clamp(min=1e-30)).any(-1)
    heavy = srt[..., :-1] > 1e-12  # lighter masses never matter: the limit is at least 0.01 here
    gap = srt[..., :-1] - srt[..., 1:]
    close = (heavy & (gap <= rel * srt[..., :-1]) & ((gap > 0) if exact_ties else True)).any(-1)
    return near_limit | close


def _int_inputs(B, H, H_kv, slots, n_valid, D=16, seed=0, lo=-3, hi=4, dtype=torch.float32):
    """Integer-valued q (one row) and a static cache whose slots from `n_valid` on hold NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi, (B, H, 1, D), generator=g).to(dtype)
    k = torch.randint(lo, hi, (B, H_kv, slots, D), generator=g).to(dtype)
    v = torch.randn(B, H_kv, slots, D, generator=g).to(dtype)
    k[:, :, n_valid:] = float("nan")
    v[:, :, n_valid:] = float("nan")
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


# (H, H_kv, D, slots, block, position, window, device position, k strided with a non-unit last stride)
STATS_CASES = [
    (2, 2, 64, 16, 16, 9, None, False, False),  # one block
    (4, 2, 128, 700, 16, 649, None, True, False),
    (8, 2, 64, 1120, 16, 999, 100, True, True),  # 70 blocks
    (4, 2, 64, 448, 64, 300, 50, False, True),
    (8, 2, 128, 500, 48, 430, 70, True, False),  # 48-key blocks: tiles of 16
    (2, 2, 64, 1000, 128, 999, None, False, False),  # 128-key blocks: two tiles each, the row in the last slot
    (4, 1, 64, 300, 32, 20, 7, True, False),  # the row in the first block, a window of 7 keys
    (4, 1, 256, 700, 64, 649, 200, True, False),  # Gemma 3's shape: one kv head, head dim 256, a window
    (4, 1, 256, 700, 64, 649, None, True, True),  # its global layers
]


@pytest.mark.parametrize("H, H_kv, D, slots, blk, pos, window, device_pos, strided", STATS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_stats_equal_float64(H, H_kv, D, slots, blk, pos, window, device_pos, strided, dtype):
    g = torch.Generator().manual_seed(slots + pos)
    q = torch.randn(2, H, 1, D, generator=g).to(dtype)
    k = torch.randn(2, H_kv, D, slots, generator=g).to(dtype).transpose(2, 3)  # last stride `slots`
    k = k if strided else k.contiguous()
    k[:, :, pos + 1 :] = float("nan")  # unfilled slots of a static cache must never count
    q, k = q.to(DEVICE), k.to(DEVICE)
    scale = D**-0.5
    vl = torch.tensor([pos + 1], device=DEVICE) if device_pos else None
    bmax, bsum = block_score_stats(q, k, blk, scale=scale, start=0 if device_pos else pos, valid_len=vl,
                                   window=window)
    want_max, want_sum = _stats_oracle(q, k, pos, blk, scale, window)
    n_k = -(-slots // blk)
    assert bmax.shape == bsum.shape == (2, H, n_k) and bmax.dtype == torch.float32
    empty = want_max == NEG_INF  # blocks after the row's, and wholly left of its window
    assert empty[0, 0].tolist() == [not _counted(pos, slots, window)[b * blk : (b + 1) * blk].any() for b in range(n_k)]
    assert torch.equal(bmax.cpu() == NEG_INF, empty) and (bsum.cpu()[empty] == 0).all()
    torch.testing.assert_close(bmax.cpu().double()[~empty], want_max[~empty], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(bsum.cpu().double()[~empty], want_sum[~empty], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("window", [None, 40])
def test_selection_equals_reference(gamma, window):
    """Integer-valued q and k over 40 blocks of 16 keys: `select_by_mass` on the kernel's statistics chooses the
    blocks `select_blocks_one(..., tail_mass=gamma)` chooses, at several positions (the first block: no
    candidates) and caps, with the position on the device (and on the host: the same)."""
    H, H_kv, slots, blk, scale = 4, 2, 640, 16, 0.25
    decided = total = 0
    for n_valid in (6, 100, 555, 640):
        q, k, _ = _int_inputs(1, H, H_kv, slots, n_valid, seed=n_valid + int(gamma * 100) + (window or 0))
        pos, vl = n_valid - 1, torch.tensor([n_valid], device=DEVICE)
        stats = block_score_stats(q, k, blk, scale=scale, valid_len=vl, window=window)
        mass = _mass_oracle(q, k, pos, blk, scale, window)
        ok = ~_undecided_by_rounding(mass, pos // blk, gamma).to(DEVICE)
        for cap in (1, 3, 13, 40):
            want = select_blocks_one(q, k, 0, cap, blk, valid_len=vl, tail_mass=gamma, scale=scale, window=window)
            got = select_by_mass(*stats, blk, gamma, cap, valid_len=vl, window=window)
            assert torch.equal(got.bool()[ok], want[ok]), (n_valid, cap)
            assert (got.sum(-1) <= cap).all()
            decided, total = decided + int(ok.sum()), total + ok.numel()
        host = block_score_stats(q, k, blk, scale=scale, start=pos, window=window)
        assert all(torch.equal(a, b) for a, b in zip(host, stats, strict=True))
        assert torch.equal(select_by_mass(*host, blk, gamma, cap, start=pos, window=window), got)
    assert decided >= 0.9 * total  # the comparison is not vacuous


@pytest.mark.parametrize("gamma, cap, kept", [(0.5, 99, 5), (0.5, 3, 3), (0.95, 99, 10), (0.95, 7, 7), (0.2, 1, 1)])
def test_equal_blocks_go_to_the_lower_index(gamma, cap, kept):
    """Ten identical candidate blocks (the same keys in the same order: equal masses, bit for bit) of 2/21 of the
    mass each, the own block 1/21: the kept ones are the lowest indices, as many as the rule allows (block i
    joins while (10 - i) 2/21 > 1 - gamma: 5 at gamma 0.5, 10 at 0.95, 2 at 0.2) and the cap, as in the
    reference."""
    blk, pos = 16, 10 * 16 + 1  # the own block holds two keys
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(1, 4, 1, 16)
    q[..., 0] = 1.0  # scores are the keys' first component
    block = torch.randint(-3, 4, (1, 2, blk, 16), generator=g).float()
    block[..., 0] = -30.0
    block[:, :, 0, 0] = 0.0  # one key of score 0 per candidate block: mass 1 each, the others ~0
    k = torch.cat([block.repeat(1, 1, 10, 1), torch.full((1, 2, blk, 16), float("nan"))], dim=2)
    k[:, :, 10 * blk : pos + 1] = 0.0
    k[:, :, 10 * blk : pos + 1, 0] = -2 * torch.log(torch.tensor(2.0))  # two keys of mass 1/4 each: own 0.5 / 10.5
    q, k = q.to(DEVICE), k.to(DEVICE)
    vl = torch.tensor([pos + 1], device=DEVICE)
    dyn = DynamicSelection(1, blk, cap, tail_mass=gamma)
    got, *_ = select_extra_mass(q, k, dyn, block_n=16, pcl=16, n_keys=k.shape[2], scale=1.0, valid_len=vl)
    want = select_blocks_one(q, k, 0, cap, blk, valid_len=vl, tail_mass=gamma, scale=1.0)
    assert torch.equal(got.bool(), want)
    assert [row.nonzero().flatten().tolist() for row in got[0]] == [list(range(kept))] * 4


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_four_thousand_blocks_with_heavy_ties(gamma):
    """`select_by_mass` over 4000 blocks (a 4096-wide row) from statistics of few distinct values, so that masses
    repeat hundreds of times: the same blocks as `mass_select` on the masses of the same statistics, at caps that
    cut inside a run of equal masses and caps that do not bind."""
    from dam_kernels.dynamic import mass_select

    g = torch.Generator().manual_seed(int(gamma * 10))
    n_k, blk = 4000, 16
    bmax = torch.randint(-6, 1, (1, 2, n_k), generator=g).float()
    bsum = torch.randint(1, 4, (1, 2, n_k), generator=g).float()
    bmax[..., -1], bsum[..., -1] = 0.0, 1.0  # the own block, partly filled
    pos = (n_k - 1) * blk
    w = bsum.double() * torch.exp(bmax.double())
    mass64 = w / w.sum(-1, keepdim=True)
    assert not _undecided_by_rounding(mass64, n_k - 1, gamma, exact_ties=True).any()
    w32 = bsum * torch.exp(bmax - bmax.amax(-1, keepdim=True))
    mass32 = (w32 / w32.sum(-1, keepdim=True)).to(DEVICE)
    stats = bmax.to(DEVICE), bsum.to(DEVICE)
    for cap in (1, 7, 300, 4000):
        got = select_by_mass(*stats, blk, gamma, cap, start=pos)
        want = mass_select(mass32, n_k - 1, gamma, cap)
        assert torch.equal(got.bool(), want), cap
        kept, cand = got.bool()[..., :-1], mass32[..., :-1]
        lightest = torch.where(kept, cand, 2.0).amin(-1, keepdim=True)
        assert ((cand == lightest) & ~kept).any(-1).all()  # the choice cuts a run of equal masses
    assert 0 < int(got.sum(-1).max()) < 4000  # at the last cap the mass rule binds, not the cap


@pytest.mark.parametrize("n_valid, window, D, H_kv", [(300, None, 64, 2), (130, None, 64, 2), (40, None, 64, 2),
                                                     (430, 150, 64, 2), (300, None, 256, 1), (430, 150, 256, 1)])
def test_graph_loop_decode_step_with_the_mass_rule_equals_reference(monkeypatch, n_valid, window, D, H_kv):
    """A graph-loop decode step (device position, NaN past the fill level) with the exact-mass rule and 64-key
    selection blocks: `_triton_attention` selects with the fused kernels (the torch chain is never called) and
    equals the reference attention on the unpadded cache. (`sparse_attention` hands such a step to the Triton
    path on CUDA only, so the path is called directly.)"""
    from dam_kernels import dynamic

    from dam_cli.runtime.attention import _triton_attention, sparse_attention

    prof = random_profile(seed=n_valid)
    slots, blk = 448, 64
    q, k, v = _int_inputs(1, 4, H_kv, slots, n_valid, D=D, seed=n_valid)
    q = q / (D**0.5)
    dyn = DynamicSelection(1, blk, 2, tail_mass=0.9)
    want = sparse_attention(q, k[:, :, :n_valid], v[:, :, :n_valid], prof, 0, start=n_valid - 1, backend="reference",
                            dynamic=dyn, window=window)
    chosen = select_blocks_one(q, k[:, :, :n_valid], n_valid - 1, 2, blk, tail_mass=0.9, window=window)

    def torch_chain(*args, **kwargs):
        raise AssertionError("the exact-mass decode step went to the torch chain")

    monkeypatch.setattr(dynamic, "select_blocks_one", torch_chain)
    vl = torch.tensor([n_valid], device=DEVICE)
    got = _triton_attention(q, k, v, prof, 0, 0, None, dyn, valid_len=vl, window=window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert n_valid < blk or chosen.any()  # the selection adds blocks


def test_candidate_list_is_the_groups_union_outside_the_static_ranges():
    """`select_extra_mass`'s extra list: the kv group's selected blocks in the decode kernel's blocks, outside
    `[0, pcl)` and the recent window, ascending, as `select_extra` gives it."""
    H, H_kv, slots, blk, bn, L, n_valid = 4, 2, 320, 32, 16, 16, 300
    q, k, _ = _int_inputs(2, H, H_kv, slots, n_valid, seed=3)
    vl = torch.tensor([n_valid], device=DEVICE)
    dyn_t, extra_idx, extra_num, max_extra = select_extra_mass(
        q, k, DynamicSelection(1, blk, 4, tail_mass=0.99), block_n=bn, pcl=L, n_keys=slots, scale=0.25,
        valid_len=vl, max_extra=4 * 2 * 2)
    want = select_blocks_one(q, k, 0, 4, blk, valid_len=vl, tail_mass=0.99, scale=0.25)
    assert torch.equal(dyn_t.bool(), want) and want.any()
    n_kb, nb1 = slots // bn, L // bn
    win = max(nb1, max(L, n_valid - 1 - L + 1) // bn)
    union = want.reshape(2, H_kv, H // H_kv, -1).any(2).repeat_interleave(blk // bn, -1)[..., :n_kb]
    idx = torch.arange(n_kb, device=DEVICE)
    extra = (union & (idx >= nb1) & (idx < win)).reshape(2 * H_kv, -1)
    for r in range(2 * H_kv):
        assert extra_idx[r, : int(extra_num[r])].tolist() == torch.nonzero(extra[r]).flatten().tolist()
    assert max_extra == 16
