"""Triton helpers: searches over integer keys held in one program's registers, `WAYS - 1` probes a step.

The selection kernels (`select`, `select_mass`, `select_rows`) find a threshold over a row of block scores or
masses by searching the keys' range: a binary search takes 32 steps, each a reduction over the whole row,
with the row's one program waiting on every step. Here each step evaluates `WAYS - 1` probes at once (one
reduction of a `[WAYS, N]` tile), so the range shrinks `WAYS`-fold a step: 11 steps at 8 ways. The answer is
the same as the binary search's, as both find the one threshold the monotone predicate defines; only the
order in which a float sum is added differs (the counts are exact). Measured, the wider steps lose (`MAX_WAYS`):
the default is the binary search, one probe a step without a tile.

`search_ways(n)` picks the ways for rows of `n` (a power of two) keys: wide tiles for short rows, down to
the binary search for rows too long to hold eight copies in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The widest search (a power of two; 2 is the binary search). The binary search is the default: on an H100 the
# decode step's mass rule took 0.261 / 0.437 ms at 32K / 131K with it and 0.406 / 0.567 ms with 8 ways
# (benchmarks/decode_step.py --sweep, docs/results/benchmarks.md): its reductions are a tile wide, and a step
# costs what its elements do. Kept as an option for the sweep.
MAX_WAYS = 2


def search_ways(n: int) -> dict:
    """`{"WAYS": ..., "STEPS": ...}`, the launch keywords for rows of `n` keys: `STEPS` = ceil(32 / log2(WAYS))
    covers any 32-bit range."""
    ways = min(MAX_WAYS, 8 if n <= 2048 else 4 if n <= 4096 else 2)
    return {"WAYS": ways, "STEPS": -(-32 // (ways.bit_length() - 1))}


@triton.jit
def _over_step(key, mass, cand, limit, lo, hi, j, WAYS: tl.constexpr):
    """One step of `smallest_over_mass`: the new `(lo, hi)`."""
    w = hi - lo
    if WAYS == 2:  # the binary search: one probe, no tile
        mid = lo + w // 2
        over = tl.sum(tl.where(cand & (key <= mid.to(tl.int32)), mass, 0.0), 0) > limit
        return tl.where(over, lo, mid + 1), tl.where(over, mid, hi)
    p = lo + (j * w) // WAYS  # probes p[1..WAYS-1] in [lo, hi - 1], ascending (int64: no overflow)
    f = tl.sum(tl.where(cand[None, :] & (key[None, :] <= p.to(tl.int32)[:, None]), mass[None, :], 0.0), 1)
    n_false = tl.sum(((j >= 1) & (f <= limit)).to(tl.int64), 0)  # the predicate rises with the probe
    last_false = tl.sum(tl.where(j == n_false, p, 0), 0)
    first_true = tl.sum(tl.where(j == n_false + 1, p, 0), 0)
    new_lo = tl.where(n_false > 0, last_false + 1, lo)
    new_hi = tl.where(n_false < WAYS - 1, first_true, hi)
    return tl.where(w > 0, new_lo, lo), tl.where(w > 0, new_hi, hi)


@triton.jit
def _count_step(key, cand, k, lo, hi, j, WAYS: tl.constexpr):
    """One step of `largest_with_count`: the new `(lo, hi)`."""
    w = hi - lo
    if WAYS == 2:  # the binary search: one probe, no tile
        mid = hi - w // 2
        enough = tl.sum((cand & (key >= mid.to(tl.int32))).to(tl.int32), 0) >= k
        return tl.where(enough, mid, lo), tl.where(enough, hi, mid - 1)
    p = hi - ((WAYS - j) * w) // WAYS  # probes p[1..WAYS-1] in [lo + 1, hi], ascending
    n = tl.sum((cand[None, :] & (key[None, :] >= p.to(tl.int32)[:, None])).to(tl.int32), 1)
    n_true = tl.sum(((j >= 1) & (n >= k)).to(tl.int64), 0)  # the predicate falls with the probe
    last_true = tl.sum(tl.where(j == n_true, p, 0), 0)
    first_false = tl.sum(tl.where(j == n_true + 1, p, 0), 0)
    new_lo = tl.where(n_true > 0, last_true, lo)
    new_hi = tl.where(n_true < WAYS - 1, first_false - 1, hi)
    return tl.where(w > 0, new_lo, lo), tl.where(w > 0, new_hi, hi)


@triton.jit
def smallest_over_mass(key, mass, cand, limit, lo, hi, WAYS: tl.constexpr, STEPS: tl.constexpr):
    """The smallest `t` in `[lo, hi]` (int64 scalars within int32's range; `key` int32) with
    `sum(mass[cand & (key <= t)]) > limit`, where `hi` is known to qualify or is the answer when nothing below
    it does."""
    j = tl.arange(0, WAYS).to(tl.int64)
    for _ in range(0, STEPS):
        lo, hi = _over_step(key, mass, cand, limit, lo, hi, j, WAYS)
    return hi


@triton.jit
def largest_with_count(key, cand, k, lo, hi, WAYS: tl.constexpr, STEPS: tl.constexpr):
    """The largest `t` in `[lo, hi]` (int64 scalars within int32's range; `key` int32) with at least `k`
    candidates of `key >= t`, where `lo` is known to qualify."""
    j = tl.arange(0, WAYS).to(tl.int64)
    for _ in range(0, STEPS):
        lo, hi = _count_step(key, cand, k, lo, hi, j, WAYS)
    return lo


@triton.jit
def over_mass_and_count(key, mass, cand, limit, k, WAYS: tl.constexpr, STEPS: tl.constexpr):
    """`(smallest_over_mass(..., 0, +inf's bits), largest_with_count(..., int32's range))` of non-negative float
    keys (`key` the bits of `mass`), the two searches' steps interleaved in one loop: their reductions are
    independent, so the second costs little more than its instructions."""
    j = tl.arange(0, WAYS).to(tl.int64)
    m_lo = tl.full([], 0, tl.int64)
    m_hi = tl.full([], 0x7F800000, tl.int64)  # the bits of +inf: above every finite mass
    c_lo = tl.full([], -2147483648, tl.int64)
    c_hi = tl.full([], 2147483647, tl.int64)
    for _ in range(0, STEPS):
        m_lo, m_hi = _over_step(key, mass, cand, limit, m_lo, m_hi, j, WAYS)
        c_lo, c_hi = _count_step(key, cand, k, c_lo, c_hi, j, WAYS)
    return m_hi, c_lo
