"""Triton kernels: XAttention's summed-antidiagonal estimate (`dam_kernels.antisum`) with one pass of products.

The two-pass kernel of `dam_kernels.antisum` takes every product twice: once for each row group's softmax maximum
and sum, once more for the masses, since a (query block, key block) mass needs each row group's final maximum and
sum before its row groups can be added up. Here each product is taken once:

1. `_tile_partials_kernel`: per (row group, key tile of `BN` key groups) the tile's own maximum `m_t`, its sum
   `l_t = sum exp(s - m_t)` and, per key block of the tile, the partial mass `sum exp(s - m_t)` over the block's
   key groups, written to memory (float32; a tile needs no running maximum, so the tiles of one row group may be
   spread over programs: the grid splits each row tile's causal key tiles into `splits` runs, which fills the card
   when few heads and rows would not, as at head dim 256 with one kv head).
2. `_merge_partials_kernel`: per (head, query block) each row group's maximum `m = max_t m_t` and sum
   `l = sum_t l_t exp(m_t - m)`, then each key block's mass `sum over the block's present row groups of
   partial exp(m_t - m) / l`, divided by the query block's present row groups.

The same estimate as the two passes and as the reference `dam_kernels.block_mass.antisum_block_mass`, up to float
rounding (the shifts differ; every term is a float32 `exp` of a non-positive number, as there). The partials
cost `4 * n_row_groups * n_key_blocks` bytes per head, written once and read once, where the second pass read
every key again and took every product again; heads are taken in chunks of at most `PARTIAL_BYTES` of partials.
The row groups (`_tile_scores`, loaded once where they fit, else a chunk of a row offset a step) and the launch
settings (`antisum.default_tiles`) are those of the two-pass kernel; `flat` in the tiles makes the walk one loop
over (key tile, chunk; without `bk` a chunk is a whole row offset), each tile's partials stored at its last chunk
(`_store_partials`), so the compiler's pipeline runs on across key tiles instead of filling and draining once a tile
(the persistent-matmul pattern of Triton's tutorials). One row group in N (`row_step`) is the two-pass kernel's
alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .antisum import _chunk_product, _head_bases, _row_groups, _tile_scores

PARTIAL_BYTES = 1 << 30  # the most float32 partials held at once (heads are taken in chunks below it)
TARGET_PROGRAMS = 2048  # programs of the product pass the key splits aim for (a few per SM of an H100 / H200)
MERGE_BLOCKS = 64  # key blocks one merge step reads per row group


@triton.jit(do_not_specialize=["start", "Sq", "Sk", "base", "n_groups", "H", "G", "bh0", "nK", "nT",
                               "tiles_per_split"])
def _tile_partials_kernel(
    Q, K, PART, TM, TL,  # [B, H, Sq, D]; [B, H_kv, Sk, D]; [Hc, n_groups, nK] f32; [Hc, n_groups, nT] f32 x2
    start, Sq, Sk, base, n_groups, H, G, scale, bh0, nK, nT, tiles_per_split,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
    STRIDE: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr, GROUPED: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FLAT: tl.constexpr,
):
    hc = tl.program_id(0)  # the head within the chunk
    bh = bh0 + hc
    i0 = tl.program_id(1) * BM
    g_end = tl.minimum(base // STRIDE + i0 + BM, (Sk + STRIDE - 1) // STRIDE)  # past the tile's last causal group
    t0 = tl.program_id(2) * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, (g_end + BN - 1) // BN)
    if t0 < t1:
        offs_i = i0 + tl.arange(0, BM)
        q_base, k_base = _head_bases(Q, K, bh, H, G, s_qb, s_qh, s_kb, s_kh)
        qg = 0.0  # the row groups, where loaded once
        if GROUPED:
            qg = _row_groups(q_base, offs_i, base, start, Sq, s_qs, s_qd, STRIDE, HEAD_DIM)
        i_ok = offs_i < n_groups
        g_abs = base // STRIDE + offs_i  # each row group's absolute index: its causal key groups are j <= g_abs
        row = hc.to(tl.int64) * n_groups + offs_i
        if FLAT:  # one loop over (key tile, chunk): the pipeline runs on across key tiles
            NC: tl.constexpr = STRIDE * WIDTH // CHUNK
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for step in range(0, (t1 - t0) * NC):
                tt = t0 + step // NC
                offs_j = tt * BN + tl.arange(0, BN)
                acc += _chunk_product(q_base, k_base, offs_i, offs_j, (step % NC) * CHUNK, base, start, Sq, Sk, s_qs,
                                      s_qd, s_ks, s_kd, STRIDE, HEAD_DIM, WIDTH, CHUNK, DOT_PRECISION)
                if step % NC == NC - 1:
                    _store_partials(acc * scale, tt, offs_j, i_ok, g_abs, row, PART, TM, TL, Sk, nK, nT, STRIDE, R,
                                    BM, BN)
                    acc = tl.zeros([BM, BN], dtype=tl.float32)
        else:
            for tt in range(t0, t1):
                offs_j = tt * BN + tl.arange(0, BN)
                sc = _tile_scores(qg, q_base, k_base, offs_i, offs_j, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd,
                                  scale, STRIDE, BM, BN, HEAD_DIM, WIDTH, GROUPED, CHUNK, DOT_PRECISION)
                _store_partials(sc, tt, offs_j, i_ok, g_abs, row, PART, TM, TL, Sk, nK, nT, STRIDE, R, BM, BN)


@triton.jit
def _store_partials(sc, tt, offs_j, i_ok, g_abs, row, PART, TM, TL, Sk, nK, nT, STRIDE: tl.constexpr,
                    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Key tile `tt`'s scaled scores `sc` [BM, BN]: its maximum per row group, its sum of `exp` and its partial
    mass per key block, with the pairs that are not causal (or past the keys) left out."""
    ok = i_ok[:, None] & (offs_j[None, :] <= g_abs[:, None]) & (offs_j[None, :] * STRIDE < Sk)
    sc = tl.where(ok, sc, float("-inf"))
    mt = tl.max(sc, 1)
    p = tl.exp(sc - tl.where(mt == float("-inf"), 0.0, mt)[:, None])  # 0 where not causal
    kbs = tt * (BN // R) + tl.arange(0, BN // R)
    tl.store(PART + row[:, None] * nK + kbs[None, :], tl.sum(tl.reshape(p, (BM, BN // R, R)), 2),
             mask=i_ok[:, None] & (kbs[None, :] < nK))
    tl.store(TM + row * nT + tt, mt, mask=i_ok)
    tl.store(TL + row * nT + tt, tl.sum(p, 1), mask=i_ok)


@triton.jit(do_not_specialize=["Sk", "base", "n_groups", "bh0", "qb0", "nQ", "nK", "nT"])
def _merge_partials_kernel(
    PART, TM, TL, PRESENT, ROWS, OUT,  # as above; [n_groups] f32; [nQ - qb0] f32; [B * H, nQ, nK] f32
    Sk, base, n_groups, bh0, qb0, nQ, nK, nT,
    STRIDE: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, NT_POW2: tl.constexpr, KB: tl.constexpr,
):
    hc = tl.program_id(0)
    qbl = tl.program_id(1)  # the query block, counted from qb0
    offs_r = qbl * R + tl.arange(0, R)  # its row groups
    row = hc.to(tl.int64) * n_groups + offs_r
    g_abs = base // STRIDE + offs_r
    g_last = tl.minimum(g_abs, (Sk + STRIDE - 1) // STRIDE - 1)  # each row group's last causal key group
    offs_t = tl.arange(0, NT_POW2)
    t_ok = offs_t[None, :] <= (g_last // BN)[:, None]
    tm = tl.load(TM + row[:, None] * nT + offs_t[None, :], mask=t_ok, other=float("-inf"))
    m = tl.max(tm, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    tl_ = tl.load(TL + row[:, None] * nT + offs_t[None, :], mask=t_ok, other=0.0)
    l = tl.sum(tl_ * tl.exp(tm - m[:, None]), 1)
    weight = tl.load(PRESENT + offs_r) / tl.maximum(l, 1e-30)
    inv_rows = 1.0 / tl.load(ROWS + qbl)
    out_row = OUT + ((bh0 + hc).to(tl.int64) * nQ + qb0 + qbl) * nK
    for c0 in range(0, tl.minimum(nK, qb0 + qbl + 1), KB):  # later key blocks stay 0
        kbs = c0 + tl.arange(0, KB)
        ok = (kbs[None, :] * R <= g_last[:, None]) & (kbs[None, :] < nK)
        part = tl.load(PART + row[:, None] * nK + kbs[None, :], mask=ok, other=0.0)
        mt = tl.load(TM + row[:, None] * nT + (kbs * R // BN)[None, :], mask=ok, other=float("-inf"))
        acc = tl.sum(part * tl.exp(mt - m[:, None]) * weight[:, None], 0)
        tl.store(out_row + kbs, acc * inv_rows, mask=kbs < nK)


def head_chunk(heads: int, n_groups: int, nK: int) -> int:
    """How many heads one launch takes: as many as keep their partials within `PARTIAL_BYTES` (at least one)."""
    return max(1, min(heads, PARTIAL_BYTES // max(1, 4 * n_groups * nK)))


def key_splits(programs: int, n_tiles: int) -> int:
    """Runs of key tiles a row tile's causal tiles are split into: enough that `programs` row tiles (all heads of a
    launch) become about `TARGET_PROGRAMS` programs, at most one per tile."""
    return max(1, min(n_tiles, -(-TARGET_PROGRAMS // max(1, programs))))


def antisum_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                       scale: float | None = None, tiles: dict | None = None) -> torch.Tensor:
    """`dam_kernels.antisum.antisum_block_mass` (every row group) with each product taken once (module doc): float32
    `[B, H, nQ, nK]`, the same estimate up to float rounding. `tiles` as there."""
    from .antisum import launch_setting
    from .block_mass import antidiag_blocks, group_presence

    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    qb0, nQ, nK, scale = antidiag_blocks(q, k, start, block, stride, scale)
    base, R = qb0 * block, block // stride
    n_groups = (nQ - qb0) * R
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    present, rows = group_presence(start, Sq, qb0, nQ, block, stride, q.device)
    present = present.float()
    t, bm, bn, wide, chunk, width, precision = launch_setting(q, tiles, stride, R, R)
    flat = bool(t.get("flat")) and not wide
    n_key_groups = min(base // stride + n_groups, -(-Sk // stride))
    nT = triton.cdiv(n_key_groups, bn)
    hc = head_chunk(B * H, n_groups, nK)
    part = torch.empty(hc, n_groups, nK, dtype=torch.float32, device=q.device)
    tm = torch.empty(2, hc, n_groups, nT, dtype=torch.float32, device=q.device)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float32, device=q.device)
    strides = (*q.stride(), *k.stride())
    row_tiles = triton.cdiv(n_groups, bm)
    for bh0 in range(0, B * H, hc):
        heads = min(hc, B * H - bh0)
        splits = key_splits(heads * row_tiles, nT)
        per_split = triton.cdiv(nT, splits)
        _tile_partials_kernel[(heads, row_tiles, triton.cdiv(nT, per_split))](
            q, k, part, tm[0], tm[1], start, Sq, Sk, base, n_groups, H, H // H_kv, float(scale) / stride, bh0, nK,
            nT, per_split, *strides, STRIDE=stride, R=R, BM=bm, BN=bn, WIDTH=width, HEAD_DIM=D,
            GROUPED=wide, CHUNK=chunk, DOT_PRECISION=precision, FLAT=flat, num_warps=t["warps"],
            num_stages=t["stages"])
        _merge_partials_kernel[(heads, nQ - qb0)](
            part, tm[0], tm[1], present, rows, out, Sk, base, n_groups, bh0, qb0, nQ, nK, nT, STRIDE=stride, R=R,
            BN=bn, NT_POW2=triton.next_power_of_2(nT), KB=MERGE_BLOCKS, num_warps=4)
    return out
