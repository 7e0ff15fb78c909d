"""The compiled attention of rows in one query block (`dam_kernels.cpu_decode`, a decode step) against a float64
oracle of the same mask: static masks below and beyond L, the dynamic part chosen by exact mass inside the kernel
(and its choice against `select_blocks_one`'s) or given, retrieval heads, grouped heads, several rows, windows and a
cache cut to the window, head dims 16 to 256. Skipped where the machine has no C compiler."""

from __future__ import annotations

import pytest
import torch
from dam_kernels import cpu_decode, cpu_sparse
from dam_kernels.dynamic import dynamic_rows, select_blocks_one
from dam_kernels.layout import device_masks
from helpers import dense_masked_softmax, random_profile, random_qkv, window_mask

ATOL = 1e-5  # as test_cpu_sparse.py: within twice the float32 softmax's error against float64, plus this

needs_compiler = pytest.mark.skipif(cpu_sparse.load() is None, reason="no C compiler: the compiled kernel is off")


def _allowed(prof, start, Sq, n_keys, chosen=None, full=None, window=None, key_start=0):
    """bool `[1, H, Sq, n_keys]` over keys `key_start ..`: the static mask, the chosen blocks, the retrieval heads'
    causal keys, cut to the window."""
    rows = torch.arange(start, start + Sq)
    keys = key_start + torch.arange(n_keys)
    allowed = prof.mask_rows(0, rows, n_keys, key_start)
    if chosen is not None:  # the rows' block's selection [1, H, nK], placed at that block
        placed = torch.zeros(*chosen.shape[:2], start // 64 + 1, chosen.shape[-1], dtype=torch.bool)
        placed[:, :, start // 64] = chosen
        allowed = allowed | dynamic_rows(placed, rows, key_start + n_keys, 64)[..., key_start:]
    if full is not None:
        allowed = allowed | (full[:, None, None] & (keys[None, :] <= rows[:, None]))
    if window is not None:
        allowed = allowed & (rows[:, None] - keys[None, :] < window)
    return allowed


def _check(got, q, k, v, allowed):
    exact = dense_masked_softmax(q, k, v, allowed)
    low = dense_masked_softmax(q, k, v, allowed, dtype=torch.float32)
    bound = 2 * (low.double() - exact).abs().max().item() + ATOL
    assert got.dtype == torch.float32 and not got.isnan().any()
    err = (got.double() - exact).abs().max().item()
    assert err <= bound, (err, bound)


CASES = [  # L, start, Sq, H, H_kv, D, window, cut (the cache holds only the keys the window reaches)
    (40, 299, 1, 4, 2, 16, None, False),
    (40, 290, 3, 4, 2, 32, None, False),  # three rows in one block
    (16, 1000, 1, 9, 3, 64, None, False),  # SmolLM2's heads, beyond L
    (40, 64, 1, 4, 1, 48, None, False),  # the first row of a block; four query heads on one kv head
    (300, 10, 2, 3, 1, 96, None, False),  # a prompt of one block, below L
    (130, 700, 1, 2, 1, 256, 100, False),  # Gemma 3's head dim under a window
    (40, 500, 1, 4, 2, 16, 70, True),  # a window on a cut cache (keys from position 431)
]


@needs_compiler
@pytest.mark.parametrize("L, start, Sq, H, H_kv, D, window, cut", CASES)
@pytest.mark.parametrize("dynamic", ["none", "by mass", "given"])
def test_rows_in_one_block_equal_the_oracle(L, start, Sq, H, H_kv, D, window, cut, dynamic):
    prof = random_profile(1, H, L, p_m=0.3, p_r=0.1, p_c=0.05, seed=start + D)
    q, k, v = random_qkv(1, H, H_kv, start + Sq, start, D=D, seed=3, amp=2.0)
    key_start = start - window + 1 if cut else 0
    k, v = k[:, :, key_start:], v[:, :, key_start:]
    masks = device_masks(prof, 0, "cpu")
    full = torch.zeros(H, dtype=torch.bool)
    full[0] = dynamic != "none"  # a retrieval head beside the dynamic part
    qb = start // 64
    chosen, picked, by_mass = None, torch.zeros(1, H, qb + 1, dtype=torch.bool), None
    if dynamic == "given":
        chosen = torch.rand(1, H, qb + 1, generator=torch.Generator().manual_seed(start)) < 0.4
        chosen[..., qb] = False  # blocks before the rows' own
    elif dynamic == "by mass":
        by_mass = (0.8, 3)
    got = cpu_decode.cpu_decode_attention(q, k, v, masks, start=start, chosen=chosen, by_mass=by_mass,
                                          full_heads=full, window=window, key_start=key_start, chosen_out=picked)
    used = picked if by_mass is not None else chosen
    _check(got, q, k, v, _allowed(prof, start, Sq, k.shape[2], used, full, window, key_start))
    if by_mass is not None and window is None and qb > 0:
        assert picked[0, 1:].any()  # the case bites: blocks were chosen
    if dynamic == "none":
        _check(got, q, k, v, window_mask(prof, torch.arange(start, start + Sq), k.shape[2], key_start, window)[None])


@needs_compiler
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma, cap, window", [(0.9, 32, None), (0.6, 2, None), (0.95, 4, 200), (1.0, 64, None)])
def test_the_mass_rule_chooses_as_select_blocks_one(seed, gamma, cap, window):
    """The kernel's choice from its own scores is `select_blocks_one`'s exact-mass choice (two batch rows, several
    rows, grouped heads), also on a cache cut to the window."""
    start, Sq, H, H_kv = 900 + 37 * seed, 1 + seed % 3, 6, 2
    start = start // 64 * 64 + min(start % 64, 64 - Sq)  # rows in one block
    prof = random_profile(1, H, 32, seed=seed)
    q, k, v = random_qkv(2, H, H_kv, start + Sq, start, D=32, seed=seed, amp=2.5)
    want = select_blocks_one(q, k, start, cap, 64, tail_mass=gamma, window=window)
    key_start = start - window + 1 if window else 0
    picked = torch.zeros(2, H, start // 64 + 1, dtype=torch.bool)
    cpu_decode.cpu_decode_attention(q, k[:, :, key_start:], v[:, :, key_start:], device_masks(prof, 0, "cpu"),
                                    start=start, by_mass=(gamma, cap), window=window, key_start=key_start,
                                    chosen_out=picked)
    assert torch.equal(picked[..., : want.shape[-1]], want) and not picked[..., want.shape[-1]:].any()
    assert want.any()


@needs_compiler
def test_threads_and_batch_rows_change_nothing():
    prof = random_profile(1, 4, 40, seed=5)
    q, k, v = random_qkv(2, 4, 2, 1500, 1499, D=64, seed=5, amp=2.0)
    masks = device_masks(prof, 0, "cpu")
    one = cpu_decode.cpu_decode_attention(q, k, v, masks, start=1499, by_mass=(0.9, 8), threads=1)
    two = cpu_decode.cpu_decode_attention(q, k, v, masks, start=1499, by_mass=(0.9, 8), threads=2)
    assert torch.equal(one, two)  # heads are independent: the same bits on any number of threads
    alone = cpu_decode.cpu_decode_attention(q[1:], k[1:], v[1:], masks, start=1499, by_mass=(0.9, 8))
    assert torch.equal(one[1:], alone) and not torch.equal(one[0], one[1])


def test_supports_only_what_the_kernel_computes():
    q, k = torch.zeros(1, 2, 1, 64), torch.zeros(1, 1, 100, 64)
    assert cpu_decode.supports(q, k, start=99) and cpu_decode.supports(q, k, start=99, dyn_block=64)
    assert not cpu_decode.supports(q, k, start=99, dyn_block=32) and not cpu_decode.supports(q, k, start=99,
                                                                                            softcap=30.0)
    assert not cpu_decode.supports(q.half(), k.half(), start=99)
    assert not cpu_decode.supports(torch.zeros(1, 2, 2, 64), k, start=63)  # rows in two blocks
    assert not cpu_decode.supports(torch.zeros(1, 2, 1, 40), k, start=99)  # head dim not a multiple of 16
    assert not cpu_decode.supports(torch.zeros(1, 64, 64, 64), k, start=1 << 20)  # too many scores at once


@needs_compiler
def test_keys_that_do_not_end_at_the_last_row_are_refused():
    prof = random_profile(1, 2, 16, seed=1)
    q, k, v = random_qkv(1, 2, 1, 101, 100, D=16)
    with pytest.raises(ValueError, match="must end at the last row"):
        cpu_decode.cpu_decode_attention(q, k, v, device_masks(prof, 0, "cpu"), start=99)


@needs_compiler
@pytest.mark.parametrize("start, Sq, D, window", [(700, 1, 64, None), (290, 3, 32, None), (500, 1, 256, 100)])
def test_bfloat16_caches_are_read_in_place_and_equal_the_oracle(start, Sq, D, window):
    """bfloat16 q, k and v (a model run in bfloat16): k and v read in place and widened exactly, products and sums
    in float32, the output in bfloat16; within its rounding of the float64 oracle over the same inputs."""
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=start)
    q, k, v = random_qkv(1, 4, 2, start + Sq, start, D=D, seed=7, amp=2.0, dtype=torch.bfloat16)
    masks = device_masks(prof, 0, "cpu")
    picked = torch.zeros(1, 4, start // 64 + 1, dtype=torch.bool)
    got = cpu_decode.cpu_decode_attention(q, k, v, masks, start=start, by_mass=(0.8, 3), window=window,
                                          chosen_out=picked)
    assert got.dtype == torch.bfloat16
    allowed = _allowed(prof, start, Sq, k.shape[2], picked, None, window)
    exact = dense_masked_softmax(q, k, v, allowed)
    low = dense_masked_softmax(q, k, v, allowed, dtype=torch.float32).to(torch.bfloat16)
    bound = 2 * (low.double() - exact).abs().max().item() + 8e-3  # the helpers' bfloat16 rule
    assert (got.double() - exact).abs().max().item() <= bound
    same_in_float32 = cpu_decode.cpu_decode_attention(q.float(), k.float(), v.float(), masks, start=start,
                                                      chosen=picked, window=window)
    assert torch.equal(got, same_in_float32.to(torch.bfloat16))  # the same float32 arithmetic on the same values
