"""Triton kernels: the exact-mass selection (`DynamicSelection.tail_mass`) of one decode row, in three launches.

Beside their PyTorch reference, `dam_kernels.dynamic.select_blocks_one(..., tail_mass=gamma)` (that is
`mass_select(tail_block_mass(...))`) plus the extra-candidate list `dam_kernels.decode.dam_decode` builds from
a selection. Under `--cuda-graph` that reference is a chain of about 30 small kernels per layer and step (the
scores of every key, masking, softmax, per-block sums, a stable sort, reversed cumulative sums, a scatter,
the kv group's union, a second sort). Here:

1. `_block_stats_kernel`, one program per (batch, kv head, chunk of key blocks): the scaled scores
   `s_j = scale q.k_j` of the row's counted keys (`j <= pos`, and `pos - j < window` in a sliding-window
   layer; keys left of the window are never loaded), per key block their maximum and `sum exp(s_j - max)`.
   Each key tile is loaded once for the `G` query heads of the kv group (the tile rows of one `tl.dot`).
2. `_mass_select_kernel`, one program per (batch, query head): the block masses from those statistics
   (global maximum `M`, `mass_b = sum_b exp(max_b - M) / Z`), held in registers, then `mass_select`'s rule
   without sorting. The reference keeps the heaviest candidates (ties to the lower index) while the mass
   left out, this block's and every lighter one's, exceeds `limit = (1 - gamma) (own + candidates' total)`.
   Masses are non-negative, so their bit patterns order as they do: a binary search over them (`bit_search`) finds the
   smallest mass `t` such that the candidates of mass `<= t` hold more than `limit`. Candidates heavier
   than `t` are kept, and of those equal to `t` the lowest indices whose left-out mass (the lighter
   candidates' plus their own and every later equal one's, a reversed prefix sum) still exceeds `limit`.
   That is the reference's kept prefix of its sorted order; when it is longer than the cap,
   `select.keep_k_largest` (the top-k of `select._topk_kernel`) keeps its `cap` heaviest, ties to the lower index.
3. `select._union_kernel` (through `select.union_candidates`): the group's union as the decode kernel's
   extra candidates.

The position is read on the device (`valid_len`), and no launch depends on it, so all three can be captured
in a graph. Scores and masses are fp32 like the reference's, but summed in another order (per block, then
over blocks; the left-out masses as tree reductions, not a cumulative sum over the sorted masses): the same
blocks are chosen unless two compared quantities (two masses, or a left-out mass and the limit) differ by
rounding only. At `gamma` = 1 the limit is 0 and a block whose mass underflows in one computation but not
in the other (a score about 87 or more below the row's maximum) can be kept by one only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bit_search import largest_with_count, over_mass_and_count, smallest_over_mass
from .decode import programs_wanted
from .select import keep_from_threshold, union_candidates
from .selection import SELECT_HEAD_DIMS, DynamicSelection

MASS_RULE_WARPS = None  # warps of `_mass_select_kernel`'s one program per head (None: 8 from 2,048 blocks, else 4)


@triton.jit(do_not_specialize=["pos", "n_keys", "n_k", "H_kv", "G", "window"])
def _block_stats_kernel(
    Q, K, NVALID,  # [B, H, 1, D]; [B, H_kv, n_keys, D]; [1] int64 (DEVICE_POS)
    BMAX, BSUM,  # [B, H, n_k] f32 each
    pos, n_keys, n_k, H_kv, G, window, scale,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    DYN_BLOCK: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr, DOT_PRECISION: tl.constexpr, DEVICE_POS: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    bk = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bk // H_kv
    kvh = bk % H_kv
    if DEVICE_POS:
        pos = tl.load(NVALID).to(tl.int32) - 1
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    h = kvh * G + tl.where(g_ok, g, 0)  # [G_PAD] query heads of the group
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * s_qb + h[:, None].to(tl.int64) * s_qh + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh

    kb0 = chunk * BLOCKS_PER_PROG
    kb_lo = kb0
    if WINDOWED:  # blocks wholly left of the row's window are never loaded
        kb_lo = tl.maximum(kb0, tl.maximum(pos - window + 1, 0) // DYN_BLOCK)
    kb_hi = tl.minimum(kb0 + BLOCKS_PER_PROG, pos // DYN_BLOCK + 1)  # nor blocks after the row's
    offs_b = tl.arange(0, BLOCKS_PER_PROG)
    offs_t = tl.arange(0, TILE)
    m_acc = tl.full([G_PAD, BLOCKS_PER_PROG], float("-inf"), dtype=tl.float32)
    l_acc = tl.zeros([G_PAD, BLOCKS_PER_PROG], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        m_blk = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_blk = tl.zeros([G_PAD], dtype=tl.float32)
        for t0 in range(0, DYN_BLOCK, TILE):
            keys = kb * DYN_BLOCK + t0 + offs_t
            counted = (keys <= pos) & (keys < n_keys)
            if WINDOWED:
                counted = counted & (keys > pos - window)
            k = tl.load(k_base + keys[None, :] * s_ks + offs_d[:, None] * s_kd, mask=counted[None, :], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [G_PAD, TILE] f32
            s = tl.where(counted[None, :], s, float("-inf"))
            m_new = tl.maximum(m_blk, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_blk = l_blk * tl.exp(m_blk - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_blk = m_new
        here = offs_b[None, :] == kb - kb0
        m_acc = tl.where(here, m_blk[:, None], m_acc)
        l_acc = tl.where(here, l_blk[:, None], l_acc)
    out = (b * H_kv * G + h)[:, None].to(tl.int64) * n_k + (kb0 + offs_b)[None, :]
    ok = g_ok[:, None] & ((kb0 + offs_b) < n_k)[None, :]
    tl.store(BMAX + out, m_acc, mask=ok)
    tl.store(BSUM + out, l_acc, mask=ok)


@triton.jit
def kept_by_mass(mass, cand, own, one_minus_gamma, cap, INTERLEAVED: tl.constexpr):
    """bool like `mass` (non-negative, no -0.0): `mass_select`'s kept candidates (module doc, step 2) of one row
    whose own block holds `own`; binary searches over the masses' bits (`bit_search`) instead of a sort.
    `INTERLEAVED`: the mass rule's threshold and the cap's in one loop (a few programs, each waiting on its
    steps: decode); else the cap's only where it binds (a program per row, the card full: a prefill)."""
    limit = one_minus_gamma * (own + tl.sum(tl.where(cand, mass, 0.0), 0))
    key = mass.to(tl.int32, bitcast=True)
    k_eff = tl.minimum(cap, tl.sum(cand.to(tl.int32), 0))
    # t: the smallest mass whose candidates of mass <= t hold more than `limit` (+inf if none do: none kept);
    # t_cap: the k_eff-th largest mass.
    if INTERLEAVED:
        t, t_cap = over_mass_and_count(key, mass, cand, limit, k_eff)
    else:
        t = smallest_over_mass(key, mass, cand, limit)
        t_cap = t  # set below where the cap binds
    t = t.to(tl.int32)
    gt = cand & (key > t)
    eq = cand & (key == t)
    lighter = tl.sum(tl.where(cand & (key < t), mass, 0.0), 0)
    eq_left = tl.cumsum(tl.where(eq, mass, 0.0), 0, reverse=True)  # this equal block's and every later one's
    sel = gt | (eq & (lighter + eq_left > limit))
    if tl.sum(sel.to(tl.int32), 0) > cap:  # the kept ones are the heaviest: keep their `cap` heaviest
        if not INTERLEAVED:
            t_cap = largest_with_count(key, cand, k_eff)
        sel = keep_from_threshold(key, cand, k_eff, t_cap.to(tl.int32))
    return sel


@triton.jit(do_not_specialize=["pos", "n_k", "cap", "window"])
def _mass_select_kernel(
    BMAX, BSUM, NVALID, DYN,  # [B, H, n_k] f32 x2 from _block_stats_kernel; [1] int64; [B, H, n_k] u8
    pos, n_k, cap, one_minus_gamma, window,
    DYN_BLOCK: tl.constexpr, NK_POW2: tl.constexpr, DEVICE_POS: tl.constexpr, WINDOWED: tl.constexpr,
):
    bh = tl.program_id(0)
    if DEVICE_POS:
        pos = tl.load(NVALID).to(tl.int32) - 1
    qb = pos // DYN_BLOCK
    idx = tl.arange(0, NK_POW2)
    in_row = idx < n_k
    row = bh.to(tl.int64) * n_k
    bmax = tl.load(BMAX + row + idx, mask=in_row, other=float("-inf"))
    bsum = tl.load(BSUM + row + idx, mask=in_row, other=0.0)
    top = tl.max(bmax, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.where(bmax == float("-inf"), 0.0, bsum * tl.exp(bmax - top))
    mass = w / tl.sum(w, 0) + 0.0  # + 0.0: no -0.0, so the bits of every mass order as the floats
    cand = idx < qb
    if WINDOWED:  # `_candidates`: blocks the row's window reaches (the others hold no mass anyway)
        cand = cand & (idx * DYN_BLOCK + DYN_BLOCK - 1 > pos - window)
    own = tl.sum(tl.where(idx == qb, mass, 0.0), 0)
    sel = kept_by_mass(mass, cand, own, one_minus_gamma, cap, True)
    tl.store(DYN + row + idx, sel.to(tl.uint8), mask=in_row)


def _check_row(q: torch.Tensor, k: torch.Tensor, start: int, valid_len: torch.Tensor | None) -> None:
    B, H, Sq, D = q.shape
    assert Sq == 1, "the exact-mass kernels take one decode row"
    assert k.shape[0] == B and k.shape[3] == D and H % k.shape[1] == 0 and q.dtype == k.dtype
    assert D in SELECT_HEAD_DIMS, f"head dim {D} is not one of {SELECT_HEAD_DIMS}"
    assert valid_len is not None or 0 <= start < k.shape[2], "the row must sit inside the cache"


def block_score_stats(
    q: torch.Tensor,  # [B, H, 1, D]
    k: torch.Tensor,  # [B, H_kv, n_keys, D], any strides
    block: int,
    *,
    scale: float,
    start: int = 0,
    valid_len: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block of `block` keys, the maximum of the row's scaled scores `scale q.k_j` and the sum of
    `exp(s_j - max)`: float32 `[B, H, ceil(n_keys / block)]` each. Only keys `j <= pos` count (and
    `pos - j < window` with a window); a block without one has maximum `-inf` and sum 0. The row sits at
    `pos = start`, or `valid_len - 1` read on the device (`valid_len` a one-element int64 tensor)."""
    _check_row(q, k, start, valid_len)
    assert block % 16 == 0 and (window is None or window >= 1)
    B, H, _, D = q.shape
    H_kv, n_keys = k.shape[1], k.shape[2]
    G = H // H_kv
    n_k = triton.cdiv(n_keys, block)
    tile = min(64, block & -block)  # the largest power of two dividing the block, at most 64 keys
    per_prog = triton.next_power_of_2(triton.cdiv(n_k * B * H_kv, programs_wanted(q.device)))
    per_prog = min(16, max(2, per_prog))
    bmax = torch.empty(B, H, n_k, device=q.device, dtype=torch.float32)
    bsum = torch.empty(B, H, n_k, device=q.device, dtype=torch.float32)
    device_pos = valid_len is not None
    _block_stats_kernel[(B * H_kv, triton.cdiv(n_k, per_prog))](
        q, k, valid_len if device_pos else bmax, bmax, bsum,
        int(start), n_keys, n_k, H_kv, G, 0 if window is None else int(window), float(scale),
        q.stride(0), q.stride(1), q.stride(3), *k.stride(),
        DYN_BLOCK=block, TILE=tile, HEAD_DIM=D, G_PAD=max(16, triton.next_power_of_2(G)),
        BLOCKS_PER_PROG=per_prog, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DEVICE_POS=device_pos, WINDOWED=window is not None, num_warps=4,
    )
    return bmax, bsum


def select_by_mass(
    bmax: torch.Tensor,  # [B, H, n_k] float32, from block_score_stats
    bsum: torch.Tensor,
    block: int,
    gamma: float,
    cap: int,
    *,
    start: int = 0,
    valid_len: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """uint8 `[B, H, n_k]`: the blocks `mass_select(mass, pos // block, gamma, cap)` chooses from the block
    masses of `block_score_stats`' statistics (with a window, among the blocks `_candidates` allows), for the
    row at `pos = start` or `valid_len - 1` (read on the device)."""
    B, H, n_k = bmax.shape
    assert bsum.shape == bmax.shape and bmax.dtype == bsum.dtype == torch.float32
    assert bmax.is_contiguous() and bsum.is_contiguous()
    nk_pow2 = max(64, triton.next_power_of_2(n_k))
    dyn = torch.empty(B, H, n_k, device=bmax.device, dtype=torch.uint8)
    device_pos = valid_len is not None
    _mass_select_kernel[(B * H,)](
        bmax, bsum, valid_len if device_pos else bmax, dyn,
        int(start), n_k, max(0, int(cap)), 1.0 - float(gamma), 0 if window is None else int(window),
        DYN_BLOCK=block, NK_POW2=nk_pow2, DEVICE_POS=device_pos, WINDOWED=window is not None,
        num_warps=MASS_RULE_WARPS or (8 if nk_pow2 >= 2048 else 4),
    )
    return dyn


def select_extra_mass(
    q: torch.Tensor,  # [B, H, 1, D]
    k: torch.Tensor,  # [B, H_kv, n_keys, D], the layer's key cache
    dynamic: DynamicSelection,
    *,
    block_n: int,
    pcl: int,
    n_keys: int,
    scale: float,
    start: int = 0,
    valid_len: torch.Tensor | None = None,
    max_extra: int = 0,
    window: int | None = None,
):
    """`select.select_extra` for the exact-mass rule: `(dyn, extra_idx, extra_num, max_extra)` as
    `dam_decode(..., extra=)` takes them, in three launches.

    `dyn` uint8 `[B, H, n_k]`: the blocks (of `dynamic.block` keys) `select_blocks_one(q, k, start,
    dynamic.last_topk, dynamic.block, valid_len, tail_mass=dynamic.tail_mass, scale=scale, window=window)`
    chooses (module doc: up to rounding). `extra_idx`, `extra_num`: the group's union in blocks of `block_n`
    keys outside `[0, pcl)` and the recent window, as `select_extra` gives them. `valid_len` (a one-element
    int64 tensor) puts the row at the end of a static cache's filled slots, read on the device; otherwise it
    sits at `start`. `window`: the layer's sliding window.
    """
    assert dynamic.tail_mass is not None, "the exact-mass rule needs DynamicSelection.tail_mass"
    assert n_keys == k.shape[2] and dynamic.block % block_n == 0
    blk = dynamic.block
    bmax, bsum = block_score_stats(q, k, blk, scale=scale, start=start, valid_len=valid_len, window=window)
    dyn = select_by_mass(bmax, bsum, blk, dynamic.tail_mass, dynamic.last_topk, start=start, valid_len=valid_len,
                         window=window)
    extra_idx, extra_num, max_extra = union_candidates(dyn, k.shape[1], blk, block_n=block_n, pcl=pcl,
                                                       n_keys=n_keys, Sq=1, start=start, valid_len=valid_len,
                                                       max_extra=max_extra)
    return dyn, extra_idx, extra_num, max_extra
