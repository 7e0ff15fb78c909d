"""Triton helpers: binary searches for a threshold over integer keys held in one program's registers.

The selection kernels (`select`, `select_mass`, `select_rows`) find a threshold over a row of block scores or
masses by searching the keys' 32-bit range: 32 steps, each a reduction over the whole row. The keys are int32
(a float's bits, or bits turned into integers that order as the floats do); the bounds are int64 so that no
step overflows. `over_mass_and_count` runs the mass rule's two searches in one loop: their reductions are
independent, so a decode step's few programs wait on 32 steps instead of 64.

A search that probed 7 thresholds a step (a `[8, N]` tile, 11 steps) found the same thresholds but was slower
on an H100 at every width tried (docs/results/benchmarks.md, 2026-12-07): a step costs what its elements do.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _over_step(key, mass, cand, limit, lo, hi):
    """One step of `smallest_over_mass`: the new `(lo, hi)`. Once `lo` passes `hi` (nothing below `hi`
    qualifies), `hi` stays."""
    mid = lo + (hi - lo) // 2
    over = tl.sum(tl.where(cand & (key <= mid.to(tl.int32)), mass, 0.0), 0) > limit
    return tl.where(over, lo, mid + 1), tl.where(over, mid, hi)


@triton.jit
def _count_step(key, cand, k, lo, hi):
    """One step of `largest_with_count`: the new `(lo, hi)`."""
    mid = hi - (hi - lo) // 2
    enough = tl.sum((cand & (key >= mid.to(tl.int32))).to(tl.int32), 0) >= k
    return tl.where(enough, mid, lo), tl.where(enough, hi, mid - 1)


@triton.jit
def smallest_over_mass(key, mass, cand, limit):
    """The smallest `t` (int64) with `sum(mass[cand & (key <= t)]) > limit`, `key` the bits of the non-negative
    `mass`; +inf's bits (0x7F800000) when no finite one qualifies."""
    lo = tl.full([], 0, tl.int64)
    hi = tl.full([], 0x7F800000, tl.int64)  # the bits of +inf: above every finite mass
    for _ in range(0, 32):
        lo, hi = _over_step(key, mass, cand, limit, lo, hi)
    return hi


@triton.jit
def largest_with_count(key, cand, k):
    """The largest `t` (int64) with at least `k` candidates of `key >= t` (`k` at most the candidates' count;
    int32's maximum when `k` is 0)."""
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(0, 32):
        lo, hi = _count_step(key, cand, k, lo, hi)
    return lo


@triton.jit
def over_mass_and_count(key, mass, cand, limit, k):
    """`(smallest_over_mass(key, mass, cand, limit), largest_with_count(key, cand, k))`, the two searches' steps
    interleaved in one loop."""
    m_lo = tl.full([], 0, tl.int64)
    m_hi = tl.full([], 0x7F800000, tl.int64)
    c_lo = tl.full([], -2147483648, tl.int64)
    c_hi = tl.full([], 2147483647, tl.int64)
    for _ in range(0, 32):
        m_lo, m_hi = _over_step(key, mass, cand, limit, m_lo, m_hi)
        c_lo, c_hi = _count_step(key, cand, k, c_lo, c_hi)
    return m_hi, c_lo
