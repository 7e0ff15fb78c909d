"""XAttention's own estimate (`dam_kernels.block_mass.antisum_block_mass`: a stride's antidiagonal summed before
the softmax) against a float64 loop oracle, and its selection (`antisum_select`): causal, within its budget, the
call's last block by the exact-mass rule. Pure torch, CPU."""

from __future__ import annotations

import pytest
import torch
from dam_kernels.block_mass import antisum_block_mass, antisum_select, cumulative_select
from dam_kernels.dynamic import mass_select, tail_block_mass
from helpers import random_qkv


def _antisum_oracle(q, k, start, block, stride, scale, row_step=1):
    """Per row group i (absolute rows i*s .. i*s+s-1; rows outside the call read as zeros): the mean over t of
    scale * q[i s + s-1-t] . k[j s + t] (keys past the end read as zeros) for every key group j <= i that
    starts before the end, softmaxed, summed per key block, averaged over the block's groups holding a row.
    `row_step`: only groups whose place in their block is `row_step - 1` modulo `row_step`, unless the block has no
    such group holding a row (then all of its groups holding one)."""
    B, H, Sq, D = q.shape
    Sk, G, s = k.shape[2], H // k.shape[1], stride
    nQ, nK = -(-(start + Sq) // block), -(-Sk // block)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float64)
    groups = torch.zeros(nQ)

    def row(b, h, r):
        return q[b, h, r - start].double() if start <= r < start + Sq else torch.zeros(D, dtype=torch.float64)

    def key(b, h, c):
        return k[b, h // G, c].double() if c < Sk else torch.zeros(D, dtype=torch.float64)

    R = block // s
    row_step = min(row_step, R)
    held = range(start // s, -(-(start + Sq) // s))
    sampled_blocks = {i // R for i in held if i % R % row_step == row_step - 1}
    for i in held:
        if (i // R) < start // block or (i // R in sampled_blocks and i % R % row_step != row_step - 1):
            continue
        groups[i * s // block] += 1
        for b in range(B):
            for h in range(H):
                js = [j for j in range(i + 1) if j * s < Sk]
                sc = torch.stack([sum(row(b, h, i * s + s - 1 - t) @ key(b, h, j * s + t) for t in range(s)) / s
                                  for j in js]) * scale
                for j, p in zip(js, torch.softmax(sc, 0).tolist()):
                    out[b, h, i * s // block, j * s // block] += p
    return (out / groups.clamp(min=1)[:, None]).float()


@pytest.mark.parametrize("start, Sq, Sk, stride, H, H_kv", [
    (0, 100, 100, 4, 2, 1), (0, 128, 128, 8, 4, 2), (37, 50, 90, 4, 2, 2), (64, 64, 140, 8, 3, 1),
    (5, 120, 130, 16, 2, 1)])
def test_antisum_equals_the_loop_oracle(start, Sq, Sk, stride, H, H_kv):
    q, k, _ = random_qkv(1, H, H_kv, Sk, start, 16, seed=start + Sq)
    q = q[:, :, :Sq]  # rows start .. start+Sq-1 of Sk >= start+Sq keys
    got = antisum_block_mass(q, k, start, 32, stride)
    want = _antisum_oracle(q, k, start, 32, stride, 16**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    present = torch.zeros(got.shape[2], dtype=torch.bool)
    present[start // 32: (start + Sq - 1) // 32 + 1] = True
    sums = got.sum(-1)
    torch.testing.assert_close(sums[..., present], torch.ones_like(sums[..., present]))
    assert not got[..., ~present, :].any()
    causal = torch.arange(got.shape[3])[None, :] <= torch.arange(got.shape[2])[:, None]
    assert not got[..., ~causal].any()


def test_antisum_sees_a_key_the_mean_dilutes():
    # One key far outside the rest: its block carries the estimate, as in the exact mass.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 512, 16, generator=g) * 0.1
    k = torch.randn(1, 1, 512, 16, generator=g) * 0.1
    q[0, 0, 448:] = 1.0
    k[0, 0, 130] = 4.0  # block 2 of 64
    mass = antisum_block_mass(q, k, 0, 64, 8)
    assert int(mass[0, 0, 7, :7].argmax()) == 2
    exact = tail_block_mass(q[:, :, 448:], k, 448, 64, 16**-0.5)
    assert int(exact[0, 0, :7].argmax()) == 2


def test_antisum_select_rule_budget_and_tail():
    q, k, _ = random_qkv(1, 4, 2, 700, 0, 16, seed=3)
    sel = antisum_select(q, k, 0, 64, 0.9, 3, stride=8, tail_mass=0.9, tail_cap=5)
    nQ = sel.shape[2]
    assert sel.shape == (1, 4, nQ, nQ)
    assert not (sel & ~(torch.arange(nQ)[None, :] < torch.arange(nQ)[:, None])).any()  # earlier blocks only
    assert int(sel[..., :-1, :].sum(-1).max()) <= 3
    want_rest = cumulative_select(antisum_block_mass(q[:, :, :640], k, 0, 64, 8), 0.9, 3)
    assert torch.equal(sel[:, :, :-1], want_rest[:, :, : nQ - 1] & (torch.arange(nQ - 1) < 10)[:, None])
    want_tail = mass_select(tail_block_mass(q[:, :, 640:], k, 640, 64, 16**-0.5), nQ - 1, 0.9, 5)
    assert torch.equal(sel[:, :, -1], want_tail)


def test_the_prompts_share_apart_from_the_tails():
    """`mass` sets the share the prompt's blocks keep of their estimate; `tail_mass` then only the last block's
    exact-mass rule: the same selection as `antisum_select` given the two shares, and without `mass` the tail's
    share is the prompt's."""
    from dam_kernels.dynamic import select_blocks

    q, k, _ = random_qkv(1, 4, 2, 700, 0, 16, seed=4)
    got = select_blocks(q, k, 0, 6, 64, tail_topk=11, score="antisum", tail_mass=1.0, mass=0.6)
    assert torch.equal(got, antisum_select(q, k, 0, 64, 0.6, 6, stride=8, tail_mass=1.0, tail_cap=11))
    assert int(got[:, :, -1].sum(-1).min()) == 10  # the tail keeps every earlier block (11 with its own)
    same = select_blocks(q, k, 0, 6, 64, tail_topk=11, score="antisum", tail_mass=0.6)
    assert torch.equal(same[:, :, :-1], got[:, :, :-1]) and not torch.equal(same[:, :, -1], got[:, :, -1])


@pytest.mark.parametrize("start, Sq, row_step", [(0, 128, 2), (0, 100, 4), (37, 90, 4), (64, 70, 8), (0, 128, 16)])
def test_one_row_group_in_row_step_equals_the_loop_oracle(start, Sq, row_step):
    """`row_step` estimates each query block from one row group in `row_step` (the last of each run), or from every
    group holding a row where none of those does (a block cut by the call's end)."""
    q, k, _ = random_qkv(1, 2, 1, start + Sq, start, 16, seed=Sq + row_step)
    got = antisum_block_mass(q, k, start, 32, 4, row_step=row_step)
    torch.testing.assert_close(got, _antisum_oracle(q, k, start, 32, 4, 16**-0.5, row_step), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, antisum_block_mass(q, k, start, 32, 4))
