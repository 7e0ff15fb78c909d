"""Triton kernel: the exact attention mass per key block of a prompt's last rows (`dynamic.tail_block_mass`).

Beside its PyTorch reference, `dam_kernels.dynamic.tail_block_mass_reference` (same arguments, the same result up to
float rounding): rows q `[B, H, r, D]` at positions `first .. first + r - 1`, each row's softmax of `scale q.k` over its
causal keys (within its `window`, if given) summed per key block of `block` keys, then averaged over the rows.

The reference holds every row's float32 scores over every key (`[B, H_kv, G r, Sk]`: 1 GiB for the 256 rows of a
kv group of Llama-3.2-1B at 131,072 tokens) and walks them five times (mask, maximum, exp, sum, a product with the
rows' weights), after widening the keys to float32. Here:

1. `_tail_stats_kernel`, one program per (batch and kv head, tile of `BR` of the group's `G r` rows, run of key
   blocks): each key block's scores against the row tile (one `tl.dot`, products in the inputs' dtype with
   float32 accumulation, exact for 2-byte inputs), masked to the row's causal keys and window, reduced at once to
   the block's maximum and `sum exp(s - max)` per row. Blocks left of the first row's window or after the last
   row's block are not read.
2. Torch, on `[B, H_kv, nK, G r]` statistics (`1 / block` of the scores): each row's maximum over the blocks,
   its normaliser `Z`, its block masses `sum_b exp(max_b - M) / Z`, and their mean over the rows of each head.

Memory: two float32 statistics per (row, key block) instead of one score per (row, key), read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 2048  # programs the runs of key blocks aim for (a few per SM of an H100 / H200)
STATS_BYTES = 1 << 28  # the most statistics held at once (256 MiB); more batch rows are taken in turn


@triton.jit(do_not_specialize=["first", "r", "Sk", "nK", "H_kv", "G", "window", "kb_end", "blocks_per_prog"])
def _tail_stats_kernel(
    Q, K, BMAX, BSUM,  # [B, H, r, D]; [B, H_kv, Sk, D]; [B * H_kv, nK, G * r] f32 x2 (-inf / 0 where not set)
    first, r, Sk, nK, H_kv, G, window, scale, kb_end, blocks_per_prog,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
    BLOCK: tl.constexpr, BR: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bk = tl.program_id(0)
    b = bk // H_kv
    kvh = bk % H_kv
    rows = tl.program_id(1) * BR + tl.arange(0, BR)  # the group's rows: query head g = row // r, row t = row % r
    row_ok = rows < G * r
    t = tl.where(row_ok, rows % r, 0)
    h = kvh * G + tl.where(row_ok, rows // r, 0)
    pos = first + t  # each row's absolute position
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * s_qb + h[:, None].to(tl.int64) * s_qh + t[:, None].to(tl.int64) * s_qs
                + offs_d[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    kb_lo = tl.program_id(2) * blocks_per_prog
    kb_hi = tl.minimum(kb_lo + blocks_per_prog, kb_end)
    if WINDOWED:  # blocks wholly left of the first row's window hold no key any row counts
        kb_lo = tl.maximum(kb_lo, tl.maximum(first - window + 1, 0) // BLOCK)
    offs_k = tl.arange(0, BLOCK)
    out = (bk.to(tl.int64) * nK) * (G * r) + rows
    for kb in range(kb_lo, kb_hi):
        keys = kb * BLOCK + offs_k
        k = tl.load(k_base + keys[None, :].to(tl.int64) * s_ks + offs_d[:, None] * s_kd,
                    mask=(keys < Sk)[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [BR, BLOCK] f32
        counted = (keys[None, :] <= pos[:, None]) & (keys < Sk)[None, :]
        if WINDOWED:
            counted = counted & (keys[None, :] > pos[:, None] - window)
        s = tl.where(counted, s, float("-inf"))
        m = tl.max(s, 1)
        ssum = tl.sum(tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 1)
        at = out + kb * (G * r)  # out is int64
        tl.store(BMAX + at, m, mask=row_ok)
        tl.store(BSUM + at, ssum, mask=row_ok)


def supports(q: torch.Tensor, first) -> bool:
    """Whether `tail_block_mass` runs here: CUDA tensors of a float dtype, a head dim of at most 256, `first` an
    int (a device-side position stays on the reference, as under a CUDA graph)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256
            and isinstance(first, int))


def row_tile(q: torch.Tensor) -> int:
    """Rows a program holds: 64, or 32 for float32 rows of more than 128 dims (registers)."""
    return 32 if q.element_size() == 4 and q.shape[-1] > 128 else 64


def tail_block_mass(q: torch.Tensor, k: torch.Tensor, first: int, block: int, scale: float | None = None,
                    window: int | None = None) -> torch.Tensor:
    """`dam_kernels.dynamic.tail_block_mass` (module doc): float32 `[B, H, ceil(Sk / block)]`."""
    B, H, r, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    nK = -(-Sk // block)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    rows = G * r
    kb_end = min(nK, (first + r - 1) // block + 1)  # past the last row's block
    br = row_tile(q)
    # Batch rows in turn where their statistics would exceed STATS_BYTES (two float32 per row and key block).
    per_b = max(1, STATS_BYTES // (8 * H_kv * nK * rows))
    parts = []
    for b0 in range(0, B, per_b):
        qb, kb = q[b0 : b0 + per_b], k[b0 : b0 + per_b]
        nb = qb.shape[0]
        bmax = torch.full((nb * H_kv, nK, rows), float("-inf"), dtype=torch.float32, device=q.device)
        bsum = torch.zeros(nb * H_kv, nK, rows, dtype=torch.float32, device=q.device)
        programs = nb * H_kv * triton.cdiv(rows, br)
        per = max(1, triton.cdiv(kb_end * programs, TARGET_PROGRAMS))
        grid = (nb * H_kv, triton.cdiv(rows, br), max(1, triton.cdiv(kb_end, per)))
        _tail_stats_kernel[grid](
            qb, kb, bmax, bsum, first, r, Sk, nK, H_kv, G, 0 if window is None else int(window), float(scale),
            kb_end, per, *qb.stride(), *kb.stride(), BLOCK=block, BR=br, HEAD_DIM=D,
            BLOCK_D=max(16, triton.next_power_of_2(D)), WINDOWED=window is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
        m = bmax.amax(1, keepdim=True)  # each row's maximum over its blocks
        w = bsum.mul_(torch.exp(bmax.sub_(m)))  # each block's sum of exp(s - M); blocks with no key: 0
        w.div_(w.sum(1, keepdim=True) * r)  # each row's block masses, over r: the mean over a head's rows below
        parts.append(w.view(nb, H_kv, nK, G, r).sum(-1).permute(0, 1, 3, 2).reshape(nb, H, nK))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
