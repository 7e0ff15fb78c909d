"""Block selections by estimated attention mass (`dam_kernels.block_mass`): the antidiagonal estimate
(XAttention) against a float64 oracle and the exact mass, the pooled estimate (FlexPrefill's query-aware
pattern), the cumulative and per-head selections against loop oracles, causality and budgets. Pure torch, CPU
(the exact scores' TF32 path on a GPU)."""

from __future__ import annotations

import pytest
import torch
from dam_kernels.block_mass import (
    antidiag_block_mass,
    antidiag_pairs,
    antidiag_select,
    cumulative_select,
    flex_select,
    global_select,
    pooled_block_mass,
)
from dam_kernels.dynamic import mass_scores, mass_select, select_blocks, tail_block_mass
from helpers import random_qkv


def _antidiag_oracle(q, k, start, block, stride, scale):
    """The estimate written out in float64 and loops: per row, softmax over its sampled causal keys
    ((r + c) % stride == stride - 1), summed per key block, averaged over the block's rows that sample a key."""
    B, H, Sq, D = q.shape
    Sk, G = k.shape[2], H // k.shape[1]
    nQ, nK = -(-(start + Sq) // block), -(-Sk // block)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float64)
    rows = torch.zeros(nQ)
    for i in range(Sq):
        r = start + i
        keys = [c for c in range(r + 1) if (r + c) % stride == stride - 1]
        if not keys:
            continue
        rows[r // block] += 1
        for b in range(B):
            for h in range(H):
                s = torch.stack([q[b, h, i].double() @ k[b, h // G, c].double() for c in keys]) * scale
                for c, p in zip(keys, torch.softmax(s, 0).tolist()):
                    out[b, h, r // block, c // block] += p
    return out / rows.clamp(min=1)[:, None]


def _global_oracle(mass, gamma, cap):
    """global_select for one head ([nQ, nK]) with Python loops."""
    nQ, nK = mass.shape
    m = mass.tolist()
    own = sum(m[qb][qb] for qb in range(min(nQ, nK)))
    total = own + sum(m[qb][kb] for qb in range(nQ) for kb in range(min(qb, nK)))
    pairs = []
    for qb in range(nQ):
        ranked = sorted(range(min(qb, nK)), key=lambda kb: (-m[qb][kb], kb))[:cap]
        pairs += [(qb, kb) for kb in ranked if m[qb][kb] > 0]
    out, kept = torch.zeros(nQ, nK, dtype=torch.bool), own
    for qb, kb in sorted(pairs, key=lambda p: (-m[p[0]][p[1]], p[0], p[1])):
        if kept >= gamma * total:
            break
        out[qb, kb], kept = True, kept + m[qb][kb]
    return out


@pytest.mark.parametrize("S, start, stride, block", [(70, 0, 4, 16), (70, 37, 4, 16), (64, 20, 2, 8),
                                                     (45, 0, 8, 16), (33, 32, 8, 8)])
def test_antidiag_estimate_equals_the_float64_oracle(S, start, stride, block):
    q, k, _ = random_qkv(2, 4, 2, S, start, seed=1, amp=1.5)
    got = antidiag_block_mass(q, k, start, block, stride)
    want = _antidiag_oracle(q, k, start, block, stride, 16**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    present = want.sum(-1) > 0
    torch.testing.assert_close(got.sum(-1)[present], torch.ones_like(got.sum(-1)[present]))


@pytest.mark.parametrize("S, start", [(70, 0), (70, 37), (128, 64)])
def test_stride_one_is_the_exact_mass(S, start):
    blk = 16
    q, k, _ = random_qkv(1, 6, 2, S, start, seed=2, amp=2.0)
    got = antidiag_block_mass(q, k, start, blk, stride=1)
    for qb in range(start // blk, (S - 1) // blk + 1):
        r0, r1 = max(start, qb * blk), min(S, (qb + 1) * blk)
        exact = tail_block_mass(q[:, :, r0 - start:r1 - start], k[:, :, :r1], r0, blk)
        torch.testing.assert_close(got[:, :, qb, :exact.shape[-1]], exact, rtol=1e-5, atol=1e-6)


def test_constant_tiles_estimate_their_exact_mass():
    # Every key of block kb is v_kb and every row is u, so each earlier tile's scores are constant; the own
    # block's keys score -1000 (no mass). Each row samples block/stride keys of every earlier tile: the
    # estimate is the exact mass, though it reads one key in 8.
    blk, stride, nb, D = 16, 8, 5, 4
    g = torch.Generator().manual_seed(4)
    u = torch.randn(D, generator=g)
    a = torch.tensor([0.5, 1.5, -0.5, 1.0, -1000.0]) / D**-0.5  # the tiles' scores once scaled
    k = (a[:, None] * u / u.dot(u)).repeat_interleave(blk, 0)
    q = u.expand(1, 1, blk, D).contiguous()
    k = k[None, None]
    start = (nb - 1) * blk
    got = antidiag_block_mass(q, k, start, blk, stride)[0, 0, nb - 1]
    exact = tail_block_mass(q, k, start, blk)[0, 0]
    assert exact[-1] == 0 and exact[:-1].min() > 0.01  # the tiles differ and all carry mass
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-7)


def test_antidiagonal_sample_sees_a_needle_from_one_row_in_stride():
    # One key (position 21, block 1) scores 50 for every row, all others 0. In query block 3 (rows 48..63)
    # only the rows with (r + 21) % 4 == 3, one in 4, sample it and put their mass there; the others spread
    # theirs evenly over their sampled keys. The exact mass of block 1 is about 1: the sample sees a quarter.
    blk, stride, D = 16, 4, 2
    q = torch.zeros(1, 1, 64, D)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 64, D)
    k[0, 0, 21, 0] = 50
    want = 0.0
    for r in range(48, 64):
        keys = [c for c in range(r + 1) if (r + c) % stride == stride - 1]
        want += 1.0 if 21 in keys else sum(16 <= c < 32 for c in keys) / len(keys)
    mass = antidiag_block_mass(q, k, 0, blk, stride, scale=1.0)[0, 0, 3]
    torch.testing.assert_close(mass[1], torch.tensor(want / 16), rtol=1e-5, atol=0)
    assert 0.25 < mass[1] < 0.5 and tail_block_mass(q[:, :, 48:], k, 48, blk, 1.0)[0, 0, 1] > 0.99
    sel = antidiag_select(q, k, 0, blk, gamma=0.3, cap=1, stride=stride, scale=1.0)[0, 0, 3]
    assert sel.tolist() == [False, True, False, False]  # still the heaviest block


@pytest.mark.parametrize("start, Sq, stride", [(0, 70, 4), (37, 33, 8), (5, 1, 8), (0, 1, 2)])
def test_antidiag_pairs_counts_the_sampled_causal_keys(start, Sq, stride):
    want = sum(1 for r in range(start, start + Sq) for c in range(r + 1) if (r + c) % stride == stride - 1)
    assert antidiag_pairs(start, Sq, stride) == want
    assert abs(antidiag_pairs(0, 4096, 8) - 4096 * 4097 / 2 / 8) < 4096  # 1/stride of the causal pairs


@pytest.mark.parametrize("gamma, cap", [(0.9, 99), (0.5, 2), (1.0, 3), (0.3, 0)])
def test_cumulative_select_is_mass_select_on_every_query_block(gamma, cap):
    g = torch.Generator().manual_seed(5)
    nQ = nK = 9
    raw = torch.rand(3, 4, nQ, nK, generator=g) ** 4
    raw = raw * (torch.arange(nK)[None, :] <= torch.arange(nQ)[:, None])
    mass = raw / raw.sum(-1, keepdim=True)
    mass[..., 4, 1] = 0  # a block without mass is never kept
    got = cumulative_select(mass, gamma, cap)
    for qb in range(nQ):
        assert torch.equal(got[..., qb, :], mass_select(mass[..., qb, :], qb, gamma, cap))
    assert not got[..., 4, 1].any()
    # The heaviest: no candidate left out outweighs a kept one of its query block.
    cand = torch.arange(nK)[None, :] < torch.arange(nQ)[:, None]
    kept_min = mass.masked_fill(~got, 2).amin(-1)
    out_max = mass.masked_fill(got | ~cand, -1).amax(-1)
    assert (out_max <= kept_min).all()
    # Enough kept: own + kept reach gamma of the row unless the cap stopped it.
    own = torch.diagonal(mass, dim1=-2, dim2=-1)
    reached = own + (mass * got).sum(-1) >= gamma * mass.sum(-1) - 1e-6
    assert (reached | (got.sum(-1) == min(cap, nK)) | (got.sum(-1) == torch.arange(nQ).clamp(max=cap))).all()


@pytest.mark.parametrize("gamma, cap", [(0.9, 99), (0.7, 2), (1.0, 4), (0.95, 1)])
def test_global_select_equals_the_loop_oracle(gamma, cap):
    g = torch.Generator().manual_seed(6)
    nQ = nK = 8
    raw = torch.rand(2, 3, nQ, nK, generator=g) ** 3 * (torch.arange(nK)[None, :] <= torch.arange(nQ)[:, None])
    mass = raw / raw.sum(-1, keepdim=True)
    got = global_select(mass, gamma, cap)
    for b in range(2):
        for h in range(3):
            assert torch.equal(got[b, h], _global_oracle(mass[b, h], gamma, cap))


def test_global_select_moves_the_budget_to_the_spread_query_block():
    # Query block 4 puts 0.96 on block 0; query block 5 spreads its mass evenly over six blocks. Per block at
    # gamma 0.9 they take 1 and 5 blocks; per head (own blocks hold 4 + 0.01 + 1/6 of 6, 0.9 of it is 5.4)
    # the 0.96 joins first, then two sixths: 3 blocks instead of 6.
    mass = torch.zeros(6, 6)
    mass[:4] = torch.eye(6)[:4]  # blocks 0..3 attend to themselves only
    mass[4, 0], mass[4, 1:5] = 0.96, 0.01
    mass[5] = 1 / 6
    per_block = cumulative_select(mass, 0.9, 99)
    per_head = global_select(mass, 0.9, 99)
    assert per_block[4].sum() == 1 and per_block[5].sum() == 5
    assert per_head[4].tolist() == [True, False, False, False, False, False]
    assert per_head[5].tolist() == [True, True, False, False, False, False]
    assert global_select(mass, 0.99, 99)[5].sum() == 5


def test_pooled_block_mass_is_the_causal_softmax_of_mean_scores():
    blk, S, start = 16, 70, 20
    q, k, _ = random_qkv(1, 4, 2, S, start, seed=7)
    got = pooled_block_mass(q, k, start, blk)
    nQ = 5
    for qb in range(start // blk, nQ):
        r0, r1 = max(start, qb * blk), min(S, (qb + 1) * blk)
        qbar = q[0, :, r0 - start:r1 - start].double().mean(1)  # [H, D]
        kbar = torch.stack([k[0, :, kb * blk:(kb + 1) * blk].double().mean(1) for kb in range(qb + 1)], 1)
        s = torch.einsum("hd,hbd->hb", qbar, kbar.repeat_interleave(2, 0)) * 16**-0.5
        torch.testing.assert_close(got[0, :, qb, :qb + 1].double(), torch.softmax(s, -1), rtol=1e-5, atol=1e-7)
        assert (got[0, :, qb, qb + 1:] == 0).all()
    assert (got[0, :, :start // blk] == 0).all()  # no row of block 0 in the call


@pytest.mark.parametrize("S, start", [(200, 0), (200, 130), (131, 130)])
@pytest.mark.parametrize("rule", ["antidiag", "flex"])
def test_selections_are_causal_within_budget_and_keep_the_exact_tail(S, start, rule):
    blk, cap, tail_cap = 16, 3, 5
    q, k, _ = random_qkv(1, 6, 2, S, start, seed=8, amp=2.0)
    qt = (S - 1) // blk
    n = max(0, qt * blk - start)  # the rows before the last query block: estimated without the tail rule
    if rule == "antidiag":
        select = lambda rows, **kw: antidiag_select(rows, k, start, blk, 0.95, cap, stride=8, **kw)  # noqa: E731
    else:
        select = lambda rows, **kw: flex_select(rows, k, start, blk, 0.95, cap, **kw)  # noqa: E731
    chosen = select(q, tail_mass=0.9, tail_cap=tail_cap)
    nQ = -(-S // blk)
    assert chosen.shape == (1, 6, nQ, nQ)
    assert not (chosen & (torch.arange(nQ)[None, :] >= torch.arange(nQ)[:, None])).any()  # strictly earlier
    assert not chosen[:, :, :start // blk].any()  # query blocks without a row in the call choose nothing
    assert (chosen[:, :, :qt].sum(-1) <= cap).all() and (chosen[:, :, qt].sum(-1) <= tail_cap).all()
    exact = select_blocks(q, k, start, 0, blk, tail_topk=tail_cap, tail_mass=0.9)[:, :, qt]
    assert torch.equal(chosen[:, :, qt], exact)
    if n > 0:
        plain = select(q[:, :, :n])
        assert plain.shape[2] == qt and torch.equal(chosen[:, :, :qt, :plain.shape[3]], plain)
        assert not chosen[:, :, :qt, plain.shape[3]:].any()
    if start == 0:
        assert chosen[:, :, 1:qt].any()  # the rule does choose blocks
    whole = select(q)  # without the tail rule the last block is estimated too
    assert whole.shape == chosen.shape and (whole[:, :, qt].sum(-1) <= cap).all()


def test_bad_settings_are_refused():
    q, k, _ = random_qkv(1, 2, 1, 40, 0)
    with pytest.raises(ValueError, match="stride"):
        antidiag_select(q, k, 0, 16, 0.9, 4, stride=3)
    with pytest.raises(ValueError, match="gamma"):
        flex_select(q, k, 0, 16, 1.5, 4)
    with pytest.raises(ValueError, match="cap"):
        antidiag_select(q, k, 0, 16, 0.9, -1)


@pytest.mark.parametrize("S, start, window", [(200, 0, None), (200, 70, None), (200, 0, 40)])
@pytest.mark.parametrize("score", ["antidiag", "antisum"])
def test_select_blocks_by_an_estimated_mass_score(S, start, window, score):
    """`select_blocks(score=...)` for a mass score is its XAttention selection (`antidiag_select` at stride
    `ANTIDIAG_STRIDE`, `antisum_select` at `ANTISUM_STRIDE`), gamma the tail mass and cap the top-k (the tail
    exact, at most the tail budget); in a sliding-window layer the pooled mean rule, whose candidates stay inside
    the window."""
    from dam_kernels.block_mass import antisum_select
    from dam_kernels.selection import ANTIDIAG_STRIDE, ANTISUM_STRIDE

    rule, stride = (antidiag_select, ANTIDIAG_STRIDE) if score == "antidiag" else (antisum_select, ANTISUM_STRIDE)
    q, k, _ = random_qkv(2, 4, 2, S, start, D=16, seed=5, amp=2.0)
    got = select_blocks(q, k, start, 3, 16, tail_topk=5, score=score, tail_mass=0.85, window=window)
    if window is None:
        want = rule(q, k, start, 16, 0.85, 3, stride=stride, tail_mass=0.85, tail_cap=5)
        assert not torch.equal(got, select_blocks(q, k, start, 3, 16, tail_topk=5, tail_mass=0.85))
    else:
        want = select_blocks(q, k, start, 3, 16, tail_topk=5, score="mean", tail_mass=0.85, window=window)
    assert torch.equal(got, want) and got.any()


@pytest.mark.parametrize("start", [0, 70])
def test_one_summed_estimate_per_kv_head(start):
    """`antisum_select(per_kv_head=True)`: every query block but the last takes the blocks that `cumulative_select`
    keeps of the summed estimate of the group's mean query, the same for every query head of a kv head; the last
    block stays per head (the exact-mass rule); a model with one query head per kv head is unchanged."""
    from dam_kernels.block_mass import antisum_block_mass, antisum_select, group_queries

    q, k, _ = random_qkv(1, 6, 2, 320, start, D=16, seed=11, amp=2.0)
    got = antisum_select(q, k, start, 32, 0.8, 4, stride=8, tail_mass=0.8, tail_cap=6, per_kv_head=True)
    per_head = antisum_select(q, k, start, 32, 0.8, 4, stride=8, tail_mass=0.8, tail_cap=6)
    mean_q = q.view(1, 2, 3, q.shape[2], 16).mean(2)
    assert torch.allclose(group_queries(q, 2), mean_q)
    qt = (q.shape[2] + start - 1) // 32
    last_rows = qt * 32 - start
    want = cumulative_select(antisum_block_mass(mean_q[:, :, :last_rows], k, start, 32, 8), 0.8, 4)
    want &= (torch.arange(want.shape[2]) >= start // 32)[:, None]  # query blocks with a row in the call
    assert torch.equal(got[:, :, :qt], want.repeat_interleave(3, dim=1)[:, :, :qt])
    assert torch.equal(got[:, :, qt], per_head[:, :, qt])  # the question's block: exact, per head
    assert not torch.equal(got, per_head)  # the group's blocks are not each head's own
    q1, k1, _ = random_qkv(1, 2, 2, 320, start, D=16, seed=11, amp=2.0)
    assert torch.equal(antisum_select(q1, k1, start, 32, 0.8, 4, tail_mass=0.8, per_kv_head=True),
                       antisum_select(q1, k1, start, 32, 0.8, 4, tail_mass=0.8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_scores_on_tf32_cores_are_the_float32_products(dtype):
    """2-byte inputs pass into TF32 unrounded, so the scores are float64's to float32 rounding (a product rounded to
    TF32 or bf16 on the way would miss by 1e-3 or more), and the global TF32 switch is left as it was."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q = (3 * torch.randn(1, 8, 64, 128, device="cuda", generator=g)).to(dtype)
    k = (3 * torch.randn(1, 2, 4096, 128, device="cuda", generator=g)).to(dtype)
    before = torch.backends.cuda.matmul.allow_tf32
    got = mass_scores(q, k, 0.1)
    assert torch.backends.cuda.matmul.allow_tf32 == before and got.dtype == torch.float32
    want = (q.double().reshape(1, 2, -1, 128) @ k.double().transpose(-1, -2) * 0.1).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
