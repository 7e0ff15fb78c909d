"""Retrieval heads (the profile's heads on full attention) inside the split-K decode kernel: a kv group holding
one sweeps every key block of the cache, its other heads keep their own masks. Checked against the float64
masked softmax of the profile's rows (which hold the full heads' causal rows), with and without the dynamic
part, the window, soft-capping and a static cache read on the device; and against the dense overlay the decode
path used before (`FULL_HEADS_IN_DECODE = False`). CPU: Triton in the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.decode import dam_decode  # noqa: E402
from dam_kernels.dynamic import DynamicSelection, dynamic_rows, select_blocks  # noqa: E402
from dam_kernels.layout import device_masks  # noqa: E402
from helpers import dense_masked_softmax, random_profile, random_qkv, require_kernel_device, window_mask  # noqa: E402

import dam_cli.runtime.attention as attention  # noqa: E402
from dam_cli.runtime.attention import sparse_attention  # noqa: E402
from dam_cli.runtime.full_heads import full_head_flags  # noqa: E402

DEVICE = require_kernel_device()
TOL = dict(atol=2e-5, rtol=1e-4)


def _profile(full: list[bool], seed: int):
    return random_profile(heads=len(full), seed=seed, full_heads=torch.tensor([full]))


@pytest.mark.parametrize("full", [[True, False, False, False], [False, False, True, True], [True] * 4])
@pytest.mark.parametrize("S, Sq, window, softcap", [(200, 1, None, None), (131, 3, None, None), (40, 1, None, None),
                                                    (230, 2, 70, None), (190, 1, None, 5.0)])
def test_decode_kernel_sweeps_the_groups_of_full_heads(full, S, Sq, window, softcap):
    prof = _profile(full, seed=S + Sq)
    start = S - Sq
    q, k, v = random_qkv(2, 4, 2, S, start, seed=S, device=DEVICE)
    kw = full_head_flags(prof, 0, q.device, 2)
    assert kw["full"].tolist() == [int(f) for f in full]
    assert kw["full_groups"] == int(torch.tensor(full).reshape(2, 2).any(1).sum())
    ws = {n: x for n, x in (("window", window), ("softcap", softcap)) if x is not None}
    got = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=start, scale=16**-0.5, block_n=16, **kw, **ws)
    # Without the group count (read from the flags) and with a different split: the same up to rounding.
    again = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=start, scale=16**-0.5, block_n=16,
                       full=kw["full"], **ws)
    torch.testing.assert_close(again, got, **TOL)
    allowed = window_mask(prof, torch.arange(start, S), S, window=window)
    want = dense_masked_softmax(q, k, v, allowed.to(DEVICE), scale=16**-0.5, softcap=softcap)
    torch.testing.assert_close(got.double(), want, **TOL)
    # The full heads' rows really see the middle of the cache, which their static masks alone never reach.
    static = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=start, scale=16**-0.5, block_n=16, **ws)
    heads = torch.tensor(full)
    if S > 3 * prof.pcl:
        assert (static[:, heads] - got[:, heads]).abs().max() > 1e-3
    torch.testing.assert_close(static[:, ~heads], got[:, ~heads], **TOL)  # the splits differ: rounding only


@pytest.mark.parametrize("n_valid, window", [(300, None), (130, None), (40, None), (430, 150)])
def test_graph_step_with_full_heads_equals_the_reference(n_valid, window):
    """A graph-loop decode step (device position, NaN past the fill level) with the exact-mass rule: the full
    heads inside the kernel equal the reference on the unpadded cache, and the dense overlay used before."""
    prof = _profile([False, True, False, False], seed=n_valid)
    slots = 448
    q, k, v = random_qkv(1, 4, 2, slots, slots - 1, seed=n_valid, device=DEVICE)
    k[:, :, n_valid:] = float("nan")
    v[:, :, n_valid:] = float("nan")
    dyn = DynamicSelection(1, 64, 2, tail_mass=0.9)
    want = sparse_attention(q, k[:, :, :n_valid], v[:, :, :n_valid], prof, 0, start=n_valid - 1,
                            backend="reference", dynamic=dyn, window=window)
    vl = torch.tensor([n_valid], device=DEVICE)
    got = attention._triton_attention(q, k, v, prof, 0, 0, None, dyn, valid_len=vl, window=window)
    torch.testing.assert_close(got, want, **TOL)
    assert not got.isnan().any()


def test_in_kernel_full_heads_equal_the_dense_overlay(monkeypatch):
    """The same decode steps (eager, with the selection of the dynamic part) with the full heads in the kernel and
    with them recomputed densely after it."""
    S, Sq = 230, 1
    prof = _profile([False, False, True, False], seed=5)
    q, k, v = random_qkv(2, 4, 2, S, S - Sq, seed=9, device=DEVICE)
    dyn = DynamicSelection(2, 16)
    inside = sparse_attention(q, k, v, prof, 0, start=S - Sq, backend="triton", dynamic=dyn)
    monkeypatch.setattr(attention, "FULL_HEADS_IN_DECODE", False)
    after = sparse_attention(q, k, v, prof, 0, start=S - Sq, backend="triton", dynamic=dyn)
    torch.testing.assert_close(inside, after, **TOL)
    rows = torch.arange(S - Sq, S)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(select_blocks(q, k, S - Sq, 2, 16), rows, S, 16)
    torch.testing.assert_close(inside.double(), dense_masked_softmax(q, k, v, allowed, scale=16**-0.5), **TOL)


def test_no_flags_for_a_layer_without_full_heads():
    prof = _profile([False] * 4, seed=1)
    assert full_head_flags(prof, 0, torch.device("cpu"), 2) == {}
    assert full_head_flags(random_profile(seed=1), 0, torch.device("cpu"), 2) == {}
