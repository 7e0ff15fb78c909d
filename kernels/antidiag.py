"""Triton kernels: XAttention's antidiagonal estimate of the attention mass per (query block, key block).

Beside its PyTorch reference, `dam_kernels.block_mass.antidiag_block_mass` (same arguments, same result up to
float rounding): row r reads key c where `(r + c) % stride == stride - 1`, each row's softmax over its sampled
causal keys is summed per key block and averaged over the query block's rows that read a key.

Rows and keys are taken by residue: the sampled rows of residue `rho` (positions `base + i stride + rho`) read
the keys of residue `stride - 1 - rho` (positions `j stride + stride - 1 - rho`), so each residue is a causal
q.k of `1/stride` of the rows against `1/stride` of the keys, loaded with a row stride of `stride` (no copies).
Two launches, as XAttention's own kernels do it (a product, then a softmax with block sums):

1. `_row_stats_kernel`, one program per (batch and head, residue, tile of sampled rows): the online maximum
   and sum of `exp` of each row's scaled scores over its causal sampled keys.
2. `_block_mass_kernel`, one program per (batch and head, tile of sampled rows, tile of sampled keys): for
   every residue the same scores again, `exp(s - max) / sum`, summed over the `block / stride` rows and keys of
   each (query block, key block) pair (a reshape and two sums), added over the residues in a fixed order and
   divided by the query block's row count. Tiles wholly above the diagonal return at once.

Every residue of a tile is added by one program in the same order, so the result is deterministic. Scores are
`tl.dot` in the inputs' dtype with float32 accumulation, where the reference multiplies in float32: on bf16
inputs the estimates differ in the third digit, which can change which of two nearly equal blocks is kept.
Costs two sampled products, `2 / stride` of the prompt's causal q.k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ROWS = 64  # sampled rows per program (a multiple of block // stride)
TILE_KEYS = 64  # sampled keys per tile


@triton.jit(do_not_specialize=["start", "Sq", "Sk", "base", "n_rows", "H", "G"])
def _row_stats_kernel(
    Q, K, M, L,  # [B, H, Sq, D]; [B, H_kv, Sk, D]; [B*H, STRIDE, n_rows] f32 x2
    start, Sq, Sk, base, n_rows, H, G, scale,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
    STRIDE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    rho = tl.program_id(1)
    i0 = tl.program_id(2) * BM
    b = bh // H
    kvh = (bh % H) // G
    offs_i = i0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rpos = base + offs_i * STRIDE + rho
    r_ok = (offs_i < n_rows) & (rpos >= start) & (rpos < start + Sq)
    q_ptrs = Q + b.to(tl.int64) * s_qb + (bh % H).to(tl.int64) * s_qh + (rpos - start)[:, None].to(tl.int64) * s_qs
    q = tl.load(q_ptrs + offs_d[None, :] * s_qd, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    last = tl.minimum(base + (i0 + BM - 1) * STRIDE + rho, start + Sq - 1)  # the tile's last row position
    j_hi = (last - (STRIDE - 1 - rho)) // STRIDE + 1  # sampled keys at or before it
    for j0 in range(0, j_hi, BN):
        offs_j = j0 + tl.arange(0, BN)
        kpos = offs_j * STRIDE + (STRIDE - 1 - rho)
        k_ok = kpos < Sk
        k = tl.load(k_base + kpos[None, :].to(tl.int64) * s_ks + offs_d[:, None] * s_kd,
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        ok = r_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= rpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    out = (bh.to(tl.int64) * STRIDE + rho) * n_rows + offs_i
    tl.store(M + out, m, mask=offs_i < n_rows)
    tl.store(L + out, l, mask=offs_i < n_rows)


@triton.jit(do_not_specialize=["start", "Sq", "Sk", "base", "n_rows", "H", "G", "qb0", "nQ", "nK"])
def _block_mass_kernel(
    Q, K, M, L, ROWS, OUT,  # ...; [B*H, STRIDE, n_rows] f32 x2; [nQ - qb0] f32; [B, H, nQ, nK] f32
    start, Sq, Sk, base, n_rows, H, G, qb0, nQ, nK, scale,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
    STRIDE: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    i0 = tl.program_id(1) * BM
    j0 = tl.program_id(2) * BN
    if j0 // R > qb0 + (i0 + BM - 1) // R:  # every key block after every query block of the tile
        return
    b = bh // H
    kvh = (bh % H) // G
    offs_i = i0 + tl.arange(0, BM)
    offs_j = j0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * s_qb + (bh % H).to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    acc = tl.zeros([BM // R, BN // R], dtype=tl.float32)
    for rho in range(0, STRIDE):
        rpos = base + offs_i * STRIDE + rho
        r_ok = (offs_i < n_rows) & (rpos >= start) & (rpos < start + Sq)
        q = tl.load(q_base + (rpos - start)[:, None].to(tl.int64) * s_qs + offs_d[None, :] * s_qd,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        kpos = offs_j * STRIDE + (STRIDE - 1 - rho)
        k_ok = kpos < Sk
        k = tl.load(k_base + kpos[None, :].to(tl.int64) * s_ks + offs_d[:, None] * s_kd,
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        stat = (bh.to(tl.int64) * STRIDE + rho) * n_rows + offs_i
        m = tl.load(M + stat, mask=offs_i < n_rows, other=0.0)
        inv = 1.0 / tl.maximum(tl.load(L + stat, mask=offs_i < n_rows, other=1.0), 1e-30)  # 0: a row with no key
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        ok = r_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= rpos[:, None])
        p = tl.where(ok, tl.exp(s - m[:, None]) * inv[:, None], 0.0)
        acc += tl.sum(tl.sum(tl.reshape(p, (BM // R, R, BN // R, R)), 3), 1)
    qbs = qb0 + i0 // R + tl.arange(0, BM // R)
    kbs = j0 // R + tl.arange(0, BN // R)
    rows = tl.load(ROWS + (qbs - qb0), mask=qbs < nQ, other=1.0)
    ptrs = OUT + (bh.to(tl.int64) * nQ + qbs[:, None]) * nK + kbs[None, :]
    tl.store(ptrs, acc / rows[:, None], mask=(qbs[:, None] < nQ) & (kbs[None, :] < nK))


def supports(q: torch.Tensor, block: int, stride: int) -> bool:
    """Whether `antidiag_block_mass` runs here: CUDA tensors of a float dtype, `block // stride` a power of two
    at most `TILE_ROWS // 2` (the tile reshape), a head dim of at most 256."""
    r = block // stride if stride and block % stride == 0 else 0
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and r > 0 and r & (r - 1) == 0
            and r <= TILE_ROWS // 2 and q.shape[-1] <= 256)


def row_counts(start: int, Sq: int, Sk: int, block: int, stride: int, device) -> torch.Tensor:
    """Per query block `qb0 .. nQ - 1`: its rows that read at least one sampled causal key (at least 1), f32."""
    qb0, nQ = start // block, -(-(start + Sq) // block)
    pos = torch.arange(qb0 * block, nQ * block, device=device)
    first = (stride - 1 - pos) % stride  # the row's first sampled key
    reads = (pos >= start) & (pos < start + Sq) & (first <= pos) & (first < Sk)
    return reads.view(nQ - qb0, block).sum(1).clamp(min=1).float()


def tiles_for(D: int) -> dict:
    """The launch settings for head dim `D`: sampled rows and keys per tile, warps and pipeline stages."""
    bm = TILE_ROWS if D <= 128 else TILE_ROWS // 2
    return {"bm": bm, "bn": TILE_KEYS, "warps": 4, "stages": 2}


def antidiag_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                        scale: float | None = None, tiles: dict | None = None) -> torch.Tensor:
    """`dam_kernels.block_mass.antidiag_block_mass` in two Triton launches (module doc): float32 `[B, H, nQ, nK]`.
    `tiles`: launch settings as `tiles_for` gives them (its default), e.g. for `benchmarks/antidiag_speed.py`."""
    from .block_mass import antidiag_blocks

    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    qb0, nQ, nK, scale = antidiag_blocks(q, k, start, block, stride, scale)
    base, R = qb0 * block, block // stride
    n_rows = (nQ - qb0) * R
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    stats = torch.empty(2, B * H, stride, n_rows, dtype=torch.float32, device=q.device)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float32, device=q.device)
    rows = row_counts(start, Sq, Sk, block, stride, q.device)
    common = dict(BLOCK_D=triton.next_power_of_2(D), HEAD_DIM=D,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    strides = (*q.stride(), *k.stride())
    t = tiles or tiles_for(D)
    bm, bn = t["bm"], t["bn"]
    if bm % R or bn % R:
        raise ValueError(f"tiles of {bm} x {bn} sampled rows and keys must hold whole blocks of {R}")
    launch = {"num_warps": t["warps"], "num_stages": t["stages"]}
    _row_stats_kernel[(B * H, stride, triton.cdiv(n_rows, bm))](
        q, k, stats[0], stats[1], start, Sq, Sk, base, n_rows, H, H // H_kv, float(scale), *strides,
        STRIDE=stride, BM=bm, BN=bn, **common, **launch)
    _block_mass_kernel[(B * H, triton.cdiv(n_rows, bm), triton.cdiv(nK * R, bn))](
        q, k, stats[0], stats[1], rows, out, start, Sq, Sk, base, n_rows, H, H // H_kv, qb0, nQ, nK, float(scale),
        *strides, STRIDE=stride, R=R, BM=bm, BN=bn, **common, **launch)
    return out
