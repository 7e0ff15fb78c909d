"""The binary searches of `dam_kernels.bit_search` against brute force, alone and interleaved: rows with ties, a
single candidate, none, all equal, k beyond the candidates, limits no prefix exceeds, signed keys, and masses
that are whole numbers (so every sum is exact and the threshold is one number whatever the order)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from dam_kernels.bit_search import largest_with_count, over_mass_and_count, smallest_over_mass  # noqa: E402
from helpers import require_kernel_device  # noqa: E402

DEVICE = require_kernel_device()
N = 64


@triton.jit
def _probe_kernel(KEY, MASS, CAND, OUT, limit, k, N: tl.constexpr):
    idx = tl.arange(0, N)
    key = tl.load(KEY + idx)
    mass = tl.load(MASS + idx)
    cand = tl.load(CAND + idx) != 0
    t1 = smallest_over_mass(key, mass, cand, limit)
    t2 = largest_with_count(key, cand, k)
    t3, t4 = over_mass_and_count(key, mass, cand, limit, k)  # the two in one loop
    tl.store(OUT, t1)
    tl.store(OUT + 1, t2)
    tl.store(OUT + 2, t3)
    tl.store(OUT + 3, t4)


def _search(mass: torch.Tensor, cand: torch.Tensor, limit: float, k: int, key=None) -> tuple[int, int]:
    mass_keys = key is None
    key = mass.view(torch.int32) if mass_keys else key
    out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    k_eff = min(k, int(cand.sum()))  # as keep_k_largest clamps it
    _probe_kernel[(1,)](key.to(DEVICE), mass.to(DEVICE), cand.to(torch.uint8).to(DEVICE), out, float(limit), k_eff, N=N)
    if mass_keys:  # the interleaved loop finds the same two thresholds
        assert out[2:].tolist() == out[:2].tolist()
    return int(out[0]), int(out[1])


def _brute(mass, cand, limit, k, key=None) -> tuple[int, int]:
    key = (mass.view(torch.int32) if key is None else key).long()
    kc, mc = key[cand], mass[cand].double()
    over = [int(t) for t in sorted(set(kc.tolist())) if float(mc[kc <= t].sum()) > limit]
    smallest = over[0] if over else 0x7F800000
    k_eff = min(k, int(cand.sum()))
    if k_eff == 0:
        largest = 2**31 - 1  # every t has at least 0 candidates above it
    else:
        largest = int(torch.sort(kc, descending=True).values[k_eff - 1])
    return smallest, largest


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for case in range(16):
        mass = torch.randint(0, 6 if case % 2 else 1000, (N,), generator=g).float()  # ties when the range is small
        cand = torch.rand(N, generator=g) < (0.9 if case % 3 else 0.2)
        rows.append((mass, cand))
    rows.append((torch.full((N,), 3.0), torch.ones(N, dtype=torch.bool)))  # all equal
    rows.append((torch.zeros(N), torch.ones(N, dtype=torch.bool)))  # all zero
    one = torch.zeros(N, dtype=torch.bool)
    one[17] = True
    rows.append((torch.arange(N).float(), one))  # a single candidate
    rows.append((torch.arange(N).float(), torch.zeros(N, dtype=torch.bool)))  # none
    # Eighteen exponents (sums stay below 2**24: exact in float32)
    rows.append((torch.tensor([2.0 ** (e % 18) for e in range(N)]), torch.ones(N, dtype=torch.bool)))
    return rows


def test_searches_find_the_brute_force_thresholds():
    for i, (mass, cand) in enumerate(_rows()):
        total = float(mass[cand].sum())
        for frac, k in ((0.0, 0), (0.1, 1), (0.5, 5), (0.97, 40), (1.0, 100), (0.3, 17)):
            limit = frac * total
            got = _search(mass, cand, limit, k)
            assert got == _brute(mass, cand, limit, k), (i, frac, k)


def test_largest_with_count_over_signed_keys():
    """Score keys are signed (negative scores below zero): the count search covers the whole int32 range."""
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        key = torch.randint(-2**31, 2**31 - 1, (N,), generator=g, dtype=torch.int64).to(torch.int32)
        key[:8] = key[8]  # ties
        cand = torch.rand(N, generator=g) < 0.7
        for k in (1, 8, 9, 30):
            _, got = _search(torch.zeros(N), cand, 0.0, k, key=key)
            assert got == _brute(torch.zeros(N), cand, 0.0, k, key=key)[1]

