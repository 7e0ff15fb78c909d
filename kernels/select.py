"""Triton kernels: the dynamic part's selection for one decode step, in two launches.

Beside their PyTorch reference, `dam_kernels.dynamic.select_blocks_one` (with kept block
summaries) plus the extra-candidate list `dam_kernels.decode.dam_decode` builds from a selection.
Under `--cuda-graph` that reference is a chain of about 25 small kernels per layer and step
(pooled query, block scores, a stable sort for the top-k, the kv group's union, a second sort for
the candidate list). Here:

1. `_topk_kernel`, one program per (batch, query head): the pooled query of the step's rows; the
   score of every key block before the rows' query block, from the kept summaries (the mean
   score `qbar . sum / block`, or the bound `relu(qbar) . kmax + min(qbar, 0) . kmin`); then the
   top-k without sorting. Scores become integers that order as the floats do, a 32-step binary
   search (`bit_search`) finds the k-th largest, and among blocks equal to it the lowest indices are taken (a
   prefix sum), which is what the reference's stable sort keeps. Every step is a reduction over
   the whole row held in registers, so the work is spread over `B x H` programs.
2. `_union_kernel`, one program per (batch, kv head): the union of the group's selections,
   expanded to the decode kernel's key blocks, restricted to those outside the static candidate
   ranges, written in ascending order, and its count.

A first version ran the top-k as `k` sequential "best remaining block" rounds in one
program per kv head and was slower than the torch chain (docs/results/benchmarks.md); this one replaces
the rounds with the search.

The fill level is read on the device (`valid_len`), so both launches can be captured in a graph.
The scores are fp32 like the reference's, summed in another order: the same blocks are chosen
unless two scores differ by rounding only (exact on integer-valued inputs; tested so).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bit_search import largest_with_count
from .selection import SCORES, SELECT_HEAD_DIMS, DynamicSelection

# Key blocks `_union_kernel` reads a step (one program per kv group walks the whole row): 1,024 took 0.092 ms a
# 16-layer decode step at 131K on an H100, 64 took 0.276 (benchmarks/decode_step.py --sweep).
UNION_CHUNK = 1024


@triton.jit
def keep_k_largest(key, cand, k):
    """bool like `key`: the `k` largest `key`s (int32 that order as the scores do) among the candidates `cand`,
    equal keys to the lower index, as a stable descending sort keeps them (all candidates if fewer). A 32-step
    binary search (`bit_search`) finds the k-th largest key; a prefix sum takes the lowest indices among those
    equal to it."""
    k_eff = tl.minimum(k, tl.sum(cand.to(tl.int32), 0))
    t = largest_with_count(key, cand, k_eff)  # the k_eff-th largest key
    return keep_from_threshold(key, cand, k_eff, t.to(tl.int32))


@triton.jit
def keep_from_threshold(key, cand, k_eff, t):
    """`keep_k_largest` once its k_eff-th largest key `t` is known."""
    gt = cand & (key > t)
    eq = cand & (key == t)
    need = k_eff - tl.sum(gt.to(tl.int32), 0)
    return gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))


@triton.jit(do_not_specialize=["Sq", "start", "n_k", "topk", "H", "window"])
def _topk_kernel(
    Q, SUMS, NVALID,  # [B, H, Sq, D]; [B, H_kv, n_k, D or 2D] f32 summaries; [1] int64 (DEVICE_POS)
    SC, DYN,  # [B*H, NK_POW2] f32 scratch; [B, H, n_k] u8
    Sq, start, n_k, topk, H, G, window,  # window: the layer's sliding window (used with WINDOWED)
    s_qb, s_qh, s_qs, s_qd,
    s_sb, s_sh, s_sk, s_sd,
    DYN_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, NK_POW2: tl.constexpr, CHUNK: tl.constexpr,
    BOUND: tl.constexpr, DEVICE_POS: tl.constexpr, WINDOWED: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    kvh = h // G
    if DEVICE_POS:
        start = tl.load(NVALID).to(tl.int32) - Sq
    qb = (start + Sq - 1) // DYN_BLOCK  # the rows' one query block

    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_d * s_qd
    qsum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in range(0, Sq):
        qsum += tl.load(q_base + s * s_qs).to(tl.float32)
    qbar = qsum / Sq

    # Scores of every key block, into this program's scratch row.
    sc_row = SC + bh.to(tl.int64) * NK_POW2
    s_base = SUMS + b.to(tl.int64) * s_sb + kvh.to(tl.int64) * s_sh
    offs_c = tl.arange(0, CHUNK)
    for c0 in range(0, NK_POW2, CHUNK):
        kb = c0 + offs_c
        ok = kb < qb  # candidates only: later blocks are never read
        if WINDOWED:  # and blocks the first row's window reaches
            ok = ok & (kb * DYN_BLOCK + DYN_BLOCK - 1 > start - window)
        ptr = s_base + kb[:, None] * s_sk + offs_d[None, :] * s_sd
        if BOUND:
            kmax = tl.load(ptr, mask=ok[:, None], other=0.0)
            kmin = tl.load(ptr + HEAD_DIM * s_sd, mask=ok[:, None], other=0.0)
            sc = tl.sum(kmax * tl.maximum(qbar, 0.0)[None, :], 1) + tl.sum(kmin * tl.minimum(qbar, 0.0)[None, :], 1)
        else:
            kbar = tl.load(ptr, mask=ok[:, None], other=0.0) / DYN_BLOCK
            sc = tl.sum(kbar * qbar[None, :], 1)
        tl.store(sc_row + kb, sc)
    tl.debug_barrier()

    idx = tl.arange(0, NK_POW2)
    cand = idx < qb
    if WINDOWED:
        cand = cand & (idx * DYN_BLOCK + DYN_BLOCK - 1 > start - window)
    sc = tl.load(sc_row + idx) + 0.0  # + 0.0 turns -0.0 into +0.0: equal floats, equal keys
    bits = sc.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed integers in the floats' order
    sel = keep_k_largest(key, cand, topk)
    tl.store(DYN + bh.to(tl.int64) * n_k + idx, sel.to(tl.uint8), mask=idx < n_k)


@triton.jit(do_not_specialize=["Sq", "start", "n_k", "n_kb", "max_extra", "nb1", "L"])
def _union_kernel(
    DYN, NVALID, EXTRA, EXTRA_NUM,  # [B, H, n_k] u8; [1] int64; [B*H_kv, max_extra] i32; [B*H_kv] i32
    Sq, start, n_k, n_kb, max_extra, nb1, L, H_kv, G,
    DYN_BLOCK: tl.constexpr, BN: tl.constexpr, G_PAD: tl.constexpr, CHUNK: tl.constexpr,
    DEVICE_POS: tl.constexpr,
):
    bk = tl.program_id(0)
    b = bk // H_kv
    kvh = bk % H_kv
    if DEVICE_POS:
        start = tl.load(NVALID).to(tl.int32) - Sq
    win = tl.maximum(nb1, tl.maximum(L, start - L + 1) // BN)  # the window's first decode block
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    h = kvh * G + tl.where(g_ok, g, 0)
    dyn_base = DYN + (b * H_kv * G + h).to(tl.int64) * n_k  # [G_PAD] row starts
    F: tl.constexpr = DYN_BLOCK // BN
    offs_c = tl.arange(0, CHUNK)
    count = tl.zeros([1], dtype=tl.int32)
    for c0 in range(0, n_kb, CHUNK):
        idx = c0 + offs_c
        kd = idx // F
        sel = tl.load(dyn_base[:, None] + kd[None, :], mask=g_ok[:, None] & (kd < n_k)[None, :], other=0)
        ok = (tl.max(sel.to(tl.int32), 0) > 0) & (idx >= nb1) & (idx < win) & (idx < n_kb)
        ok_i = ok.to(tl.int32)
        pos = tl.cumsum(ok_i, 0) - 1 + tl.sum(count, 0)
        tl.store(EXTRA + bk.to(tl.int64) * max_extra + pos, idx.to(tl.int32), mask=ok & (pos < max_extra))
        count += tl.sum(ok_i, 0)
    tl.store(EXTRA_NUM + bk + tl.arange(0, 1), tl.minimum(count, max_extra))


def select_extra(
    q: torch.Tensor,  # [B, H, Sq, D], all rows in one query block
    sums: torch.Tensor,  # [B, H_kv, n_k, D or 2D] float32 block summaries (dam_kernels.dynamic.block_summary)
    dynamic: DynamicSelection,
    *,
    block_n: int,
    pcl: int,
    n_keys: int,
    start: int = 0,
    valid_len: torch.Tensor | None = None,
    max_extra: int = 0,
    window: int | None = None,
):
    """The selection of one decode call: `(dyn, extra_idx, extra_num, max_extra)` as
    `dam_decode(..., extra=)` takes them.

    `dyn` uint8 `[B, H, n_k]`: each head's `dynamic.last_topk` best key blocks (of `dynamic.block`
    keys; a decode call is a call's last query block) before the rows' query block, as
    `select_blocks_one(q, k, start, dynamic.last_topk, dynamic.block, valid_len, sums,
    dynamic.score)` chooses them. `extra_idx` int32 `[B*H_kv, max_extra]`: the decode kernel's key blocks
    (of `block_n` keys, `n_keys` = the cache's slots) that some head of the group selected and
    that lie outside the static candidates `[0, L)` and the recent window, ascending; `extra_num`
    their count. `valid_len` (a one-element int64 tensor) puts the rows at the end of a static
    cache's filled slots, read on the device; otherwise they start at `start`. `window` (a sliding-window
    layer): candidates are the blocks the first row's window reaches, as `select_blocks_one` takes it.
    """
    B, H, Sq, D = q.shape
    H_kv, n_k = sums.shape[1], sums.shape[2]
    G = H // H_kv
    dyn_block, topk, bound = dynamic.block, dynamic.last_topk, dynamic.score == "bound"
    assert dynamic.score in SCORES and sums.shape[3] == (2 * D if bound else D)
    assert dyn_block % block_n == 0 and D in SELECT_HEAD_DIMS and sums.dtype == torch.float32
    assert n_k == -(-n_keys // dyn_block), "sums must cover the cache's slots"
    nk_pow2 = max(64, triton.next_power_of_2(n_k))
    dev = q.device
    sc = torch.empty(B * H, nk_pow2, device=dev, dtype=torch.float32)
    dyn = torch.empty(B, H, n_k, device=dev, dtype=torch.uint8)
    device_pos = valid_len is not None
    nv = valid_len if device_pos else dyn  # unread without DEVICE_POS
    _topk_kernel[(B * H,)](
        q, sums, nv, sc, dyn, Sq, start, n_k, max(0, int(topk)), H, G, 0 if window is None else int(window),
        *q.stride(), *sums.stride(),
        DYN_BLOCK=dyn_block, HEAD_DIM=D, NK_POW2=nk_pow2, CHUNK=64, BOUND=bound, DEVICE_POS=device_pos,
        WINDOWED=window is not None, num_warps=8 if nk_pow2 >= 2048 else 4,
    )
    extra_idx, extra_num, max_extra = union_candidates(dyn, H_kv, dyn_block, block_n=block_n, pcl=pcl,
                                                       n_keys=n_keys, Sq=Sq, start=start, valid_len=valid_len,
                                                       max_extra=max_extra)
    return dyn, extra_idx, extra_num, max_extra


def union_candidates(
    dyn: torch.Tensor,  # [B, H, n_k] uint8, a selection in blocks of dyn_block keys
    H_kv: int,
    dyn_block: int,
    *,
    block_n: int,
    pcl: int,
    n_keys: int,
    Sq: int = 1,
    start: int = 0,
    valid_len: torch.Tensor | None = None,
    max_extra: int = 0,
):
    """`_union_kernel` on a selection `dyn`: `(extra_idx, extra_num, max_extra)` as `select_extra` returns them
    (the kv group's union in the decode kernel's blocks of `block_n` keys, outside `[0, pcl)` and the recent
    window of rows `start .. start + Sq - 1`, or the last `Sq` of `valid_len` filled slots)."""
    B, H, n_k = dyn.shape
    n_kb = triton.cdiv(n_keys, block_n)
    nb1 = min(triton.cdiv(pcl, block_n), n_kb)
    max_extra = max(1, min(int(max_extra) if max_extra else n_kb, n_kb))
    extra_idx = torch.zeros(B * H_kv, max_extra, device=dyn.device, dtype=torch.int32)
    extra_num = torch.empty(B * H_kv, device=dyn.device, dtype=torch.int32)
    device_pos = valid_len is not None
    G = H // H_kv
    _union_kernel[(B * H_kv,)](
        dyn, valid_len if device_pos else extra_num, extra_idx, extra_num, Sq, start, n_k, n_kb, max_extra, nb1,
        pcl, H_kv, G,
        DYN_BLOCK=dyn_block, BN=block_n, G_PAD=max(2, triton.next_power_of_2(G)), CHUNK=UNION_CHUNK,
        DEVICE_POS=device_pos, num_warps=4,
    )
    return extra_idx, extra_num, max_extra
