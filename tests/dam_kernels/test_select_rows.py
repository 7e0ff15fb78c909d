"""The prefill's row selection by mass (`dam_kernels.select_rows`) against its PyTorch reference,
`block_mass.cumulative_select`. Masses are multiples of 1/64 below 1, so every sum either side forms is exact
and the two must choose the same blocks; exact ties come from equal masses. CPU: Triton in the interpreter;
with TRITON_INTERPRET=0 on a GPU, compiled."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels import select_rows  # noqa: E402
from dam_kernels.block_mass import antidiag_select, cumulative_select  # noqa: E402
from helpers import require_kernel_device  # noqa: E402

DEVICE = require_kernel_device()


def _masses(shape, seed, zeros=0.3):
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(1, 9, shape, generator=g).float() / 64
    m[torch.rand(shape, generator=g) < zeros] = 0.0  # blocks no sample reached
    return m


@pytest.mark.parametrize("gamma", [0.5, 0.99, 1.0])
@pytest.mark.parametrize("cap", [1, 32])
@pytest.mark.parametrize("nQ, nK", [(7, 7), (24, 24), (12, 70)])
def test_rows_select_equals_reference(nQ, nK, gamma, cap):
    mass = _masses((1, 2, nQ, nK), seed=nQ * 100 + nK + cap).to(DEVICE)
    want = cumulative_select(mass, gamma, cap)
    got = select_rows.cumulative_select(mass, gamma, cap)
    assert got.dtype == torch.bool and got.shape == mass.shape
    assert torch.equal(got, want)
    qb = torch.arange(nQ, device=DEVICE)[:, None]
    assert not (got & (torch.arange(nK, device=DEVICE)[None, :] >= qb)).any()  # earlier blocks only
    assert int(got.sum(-1).max()) <= cap


def test_cap_binds_and_ties_go_to_the_lower_block():
    mass = torch.full((1, 1, 9, 9), 0.125, device=DEVICE)  # every earlier block equal
    got = select_rows.cumulative_select(mass, 0.99, 3)
    assert got[0, 0, 8].nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.equal(got, cumulative_select(mass, 0.99, 3))


def test_an_all_zero_row_keeps_nothing():
    mass = torch.zeros(1, 2, 5, 5, device=DEVICE)
    assert not select_rows.cumulative_select(mass, 0.9, 4).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="antidiag_select dispatches to the kernel on CUDA only")
def test_antidiag_select_on_cuda_uses_the_kernel_and_matches_the_sort(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 512, 64, generator=g).half().cuda()
    k = torch.randn(1, 2, 512, 64, generator=g).half().cuda()
    monkeypatch.setattr(select_rows, "supports", lambda n_blocks: False)
    want = antidiag_select(q, k, 0, 64, 0.9, 8, stride=16)  # the sort
    monkeypatch.undo()
    calls = []
    real = select_rows.cumulative_select
    monkeypatch.setattr(select_rows, "cumulative_select", lambda *a: calls.append(1) or real(*a))
    got = antidiag_select(q, k, 0, 64, 0.9, 8, stride=16)
    assert calls and want.any() and (got == want).float().mean() > 0.999  # rounding may decide a near tie
