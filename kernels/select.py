"""Triton kernel: the dynamic part's selection for one decode step, fused into one launch.

Beside its PyTorch reference, `dam_kernels.dynamic.select_blocks_one` (with kept block sums) plus
the extra-candidate list `dam_kernels.decode.dam_decode` builds from a selection. Under
`--cuda-graph` that reference is a chain of about 25 small kernels per layer and step (pooled
query, block scores, a stable sort for the top-k, the kv group's union, a second sort for the
candidate list). This kernel does the same in one program per (batch, kv head):

1. the pooled query of each of the group's `G` heads (the mean of the step's rows);
2. the score of every key block, `qbar . (sum / block)`, for blocks before the query block (the
   others score -inf), kept in a scratch row per head;
3. `topk` rounds, each taking the best remaining block of every head (the lower block index
   among equal scores, as the reference's stable sort does), marking it in `dyn`;
4. the union over the group, expanded to the decode kernel's key blocks, restricted to those
   outside the static candidate ranges, written in ascending order to `extra`, and its count.

The fill level is read on the device (`valid_len`), so the launch can be captured in a graph.
The scores are fp32 like the reference's, but summed in another order: the same blocks are
chosen unless two scores differ by rounding only (exact on integer-valued inputs; tested so).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["Sq", "start", "n_k", "n_kb", "topk", "max_extra", "nb1", "L"])
def _select_kernel(
    Q, SUMS, NVALID,  # [B, H, Sq, D]; [B, H_kv, n_k, D] f32 block sums; [1] int64 (DEVICE_POS)
    SC, DYN, EXTRA, EXTRA_NUM,  # [B*H_kv, G_PAD, n_k] f32 scratch; [B, H, n_k] u8; [B*H_kv, max_extra] i32; [B*H_kv] i32
    Sq, start, n_k, n_kb, topk, max_extra, nb1, L, H_kv, G,
    s_qb, s_qh, s_qs, s_qd,
    s_sb, s_sh, s_sk, s_sd,
    DYN_BLOCK: tl.constexpr, BN: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr, DEVICE_POS: tl.constexpr,
):
    bk = tl.program_id(0)
    b = bk // H_kv
    kvh = bk % H_kv
    if DEVICE_POS:
        start = tl.load(NVALID).to(tl.int32) - Sq
    qb = (start + Sq - 1) // DYN_BLOCK  # the rows' one query block
    win = tl.maximum(nb1, tl.maximum(L, start - L + 1) // BN)  # the window's first decode block

    g = tl.arange(0, G_PAD)
    g_ok = g < G
    h = kvh * G + tl.where(g_ok, g, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, CHUNK)

    # 1. Pooled queries [G_PAD, D] (padded heads are zero).
    q_base = Q + b.to(tl.int64) * s_qb + h[:, None].to(tl.int64) * s_qh + offs_d[None, :] * s_qd
    qsum = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)
    for s in range(0, Sq):
        qsum += tl.load(q_base + s * s_qs, mask=g_ok[:, None], other=0.0).to(tl.float32)
    qbar = qsum / Sq

    # 2. Scores of every key block; nothing selected yet.
    sc_base = SC + bk.to(tl.int64) * G_PAD * n_k
    dyn_base = DYN + (b * H_kv * G + h).to(tl.int64) * n_k  # [G_PAD] row starts
    s_base = SUMS + b.to(tl.int64) * s_sb + kvh.to(tl.int64) * s_sh
    for c0 in range(0, n_k, CHUNK):
        kb = c0 + offs_c
        k_ok = kb < n_k
        kbar = tl.load(s_base + kb[:, None] * s_sk + offs_d[None, :] * s_sd, mask=k_ok[:, None], other=0.0) / DYN_BLOCK
        sc = tl.dot(qbar, tl.trans(kbar), input_precision="ieee")  # [G_PAD, CHUNK]
        sc = tl.where((kb < qb)[None, :], sc, float("-inf"))
        tl.store(sc_base + g[:, None] * n_k + kb[None, :], sc, mask=k_ok[None, :])
        tl.store(dyn_base[:, None] + kb[None, :], tl.zeros([G_PAD, CHUNK], dtype=tl.uint8),
                 mask=g_ok[:, None] & k_ok[None, :])
    tl.debug_barrier()

    # 3. Top-k rounds: each takes every head's best remaining block (lowest index among equals).
    for _ in range(0, topk):
        best_v = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        best_i = tl.zeros([G_PAD], dtype=tl.int32)
        for c0 in range(0, n_k, CHUNK):
            kb = c0 + offs_c
            sc = tl.load(sc_base + g[:, None] * n_k + kb[None, :], mask=(kb < n_k)[None, :], other=float("-inf"))
            m = tl.max(sc, 1)
            i = tl.min(tl.where(sc == m[:, None], kb[None, :], n_k), 1)
            better = m > best_v
            best_i = tl.where(better, i, best_i)
            best_v = tl.where(better, m, best_v)
        found = g_ok & (best_v > float("-inf"))
        tl.store(sc_base + g * n_k + best_i, tl.full([G_PAD], float("-inf"), dtype=tl.float32), mask=found)
        tl.store(dyn_base + best_i, tl.full([G_PAD], 1, dtype=tl.uint8), mask=found)
        tl.debug_barrier()

    # 4. The group's union in decode blocks of BN keys, outside the static candidates, ascending.
    F: tl.constexpr = DYN_BLOCK // BN
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
    sums: torch.Tensor,  # [B, H_kv, n_k, D] float32 block sums (dam_kernels.dynamic.block_sums)
    *,
    topk: int,
    dyn_block: int,
    block_n: int,
    pcl: int,
    n_keys: int,
    start: int = 0,
    valid_len: torch.Tensor | None = None,
    max_extra: int = 0,
):
    """The selection of one decode call, fused: `(dyn, extra_idx, extra_num, max_extra)` as
    `dam_decode(..., extra=)` takes them.

    `dyn` uint8 `[B, H, n_k]`: each head's `topk` best key blocks (of `dyn_block` keys) before the
    rows' query block, as `select_blocks_one(q, k, start, topk, dyn_block, valid_len, sums)`
    chooses them. `extra_idx` int32 `[B*H_kv, max_extra]`: the decode kernel's key blocks (of
    `block_n` keys, `n_keys` = the cache's slots) that some head of the group selected and that
    lie outside the static candidates `[0, L)` and the recent window, ascending; `extra_num` their
    count. `valid_len` (a one-element int64 tensor) puts the rows at the end of a static cache's
    filled slots, read on the device; otherwise they start at `start`.
    """
    B, H, Sq, D = q.shape
    H_kv, n_k = sums.shape[1], sums.shape[2]
    G = H // H_kv
    assert dyn_block % block_n == 0 and D in (16, 32, 64, 128) and sums.dtype == torch.float32
    assert n_k == -(-n_keys // dyn_block), "sums must cover the cache's slots"
    n_kb = triton.cdiv(n_keys, block_n)
    nb1 = min(triton.cdiv(pcl, block_n), n_kb)
    max_extra = max(1, min(int(max_extra) if max_extra else n_kb, n_kb))
    G_PAD = max(16, triton.next_power_of_2(G))  # tl.dot needs 16 rows
    dev = q.device
    sc = torch.empty(B * H_kv, G_PAD, n_k, device=dev, dtype=torch.float32)
    dyn = torch.empty(B, H, n_k, device=dev, dtype=torch.uint8)
    extra_idx = torch.zeros(B * H_kv, max_extra, device=dev, dtype=torch.int32)
    extra_num = torch.empty(B * H_kv, device=dev, dtype=torch.int32)
    device_pos = valid_len is not None
    _select_kernel[(B * H_kv,)](
        q, sums, valid_len if device_pos else extra_num, sc, dyn, extra_idx, extra_num,
        Sq, start, n_k, n_kb, max(0, int(topk)), max_extra, nb1, pcl, H_kv, G,
        *q.stride(), *sums.stride(),
        DYN_BLOCK=dyn_block, BN=block_n, G_PAD=G_PAD, HEAD_DIM=D, CHUNK=64, DEVICE_POS=device_pos,
        num_warps=4,
    )
    return dyn, extra_idx, extra_num, max_extra
