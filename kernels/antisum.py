"""Triton kernels: XAttention's own estimate of the attention mass per (query block, key block), a stride's
antidiagonal summed before the softmax.

Beside its PyTorch reference, `dam_kernels.block_mass.antisum_block_mass` (same arguments, same result up to float
rounding): rows and keys in groups of `stride`; row group i scores key group j by the mean over t of
`scale q[i s + t] . k[j s + s - 1 - t]` (the antidiagonal of their tile), softmaxed over the key groups `j <= i`,
summed per key block and averaged over the query block's row groups that hold a row of the call.

Each tile's score is one product of `stride * D`-long vectors (a row group's rows side by side against a key
group's keys last first) accumulated before any `exp` (one per row group and key group, `1 / stride^2` of the
prompt's pairs), where `dam_kernels.antidiag` takes the `exp` of every sampled pair (`1 / stride` of them). Two
launches, each one program per (batch and head, tile of row groups) walking its causal key groups tile by tile:

1. `_group_stats_kernel`: the online maximum and sum of `exp` of each row group's scores.
2. `_group_mass_kernel`: the same scores again, `exp(s - max) / sum`, summed over the `block / stride` row and key
   groups of each (query block, key block) pair and divided by the query block's present row groups.

Where a tile of row groups fits (`GROUPED`: `stride * D` a power of two, at most `GROUP_ELEMENTS` elements of 2
bytes in the tile) it is loaded once before the walk and each key tile costs one `tl.dot` `stride * D` deep, as the
query tile of a flash-attention kernel stays put; otherwise (float32, or head dims 96, 128 or 256 at stride 8) the
product is taken a chunk of one row offset a step (`_chunk_scores`: `bk` dims where the tiles set it, else the whole
row offset, its head dim padded to a power of two). Measured on an H100 (llama-1b shape, stride 8, bf16): the
estimate at 131,072 tokens took 37 ms a layer with the row groups loaded once, against 56 ms for the first
kernel (row offsets one at a time in both passes, the mass pass a grid of key tiles).
Products are `tl.dot` in the inputs' dtype with float32 accumulation (the reference multiplies in float32).

`row_step` N > 1 (`ROW_STEP`): only one row group in N of each query block is estimated (the reference's
`group_presence`), and the programs walk only those (slot u is row group `u N + N - 1`), so both passes cost 1 / N;
a call that ends inside a block before its first sampled group takes every group, weighted as the reference does.
Measured on an H100 and not adopted (it lost retrieval on the development split; docs/results/accuracy.md).

`ONE_PASS` (the default where every row group is estimated): `dam_kernels.antisum_partials` replaces the second
pass by partial masses per key tile, written once and merged, so that each product is taken once and a row tile's
key tiles may be spread over programs.

Tile settings (`default_tiles`): 2-byte inputs at head dims up to 64 take `NARROW_TILES` and head dims above 128
`WIDE_HEAD_TILES`, both 128 row groups against 128 key groups, 8 warps, 4 stages, with the products taken `bk` = 64
dims of a row offset a step (`_chunk_scores`: one flat loop the compiler pipelines, where a whole row offset a step
holds `D`-wide operands per stage and left head dim 256 at 32 row groups). The H100 sweep of
`benchmarks/antidiag_speed.py --only-summed` (22 settings at head dim 64, 15 at 256; docs/results/benchmarks.md)
found it fastest at both: Gemma 3's shape 0.48 ms at 32,768 tokens and 8.75 ms at 131,072 against 0.88 and 13.93 ms
for the former 32 x 128 a row offset a step; the llama-1b shape 17.4 against 18.7 ms at 131,072 for the former 64 x
128. Everything else takes `TILES`. A device that cannot build a setting (too little shared memory) gets `TILES`,
then the PyTorch reference (`estimate_or_reference`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ONE_PASS = True  # every row group estimated: products taken once (`dam_kernels.antisum_partials`)
GROUP_ELEMENTS = 64 * 512  # the most query elements a tile of row groups may hold to be loaded once
TILES = {"bm": 64, "bn": 64, "warps": 4, "stages": 2}  # row groups per program, key groups per step, launch
NARROW_TILES = {"bm": 128, "bn": 128, "warps": 8, "stages": 4, "grouped": False, "bk": 64}  # 2-byte, head dim <= 64
WIDE_HEAD_TILES = {"bm": 128, "bn": 128, "warps": 8, "stages": 4, "grouped": False, "bk": 64}  # head dims above 128


@triton.jit
def _head_bases(Q, K, bh, H, G, s_qb, s_qh, s_kb, s_kh):
    """The query rows' and the keys' base pointers of program row `bh` (batch * H + query head)."""
    b = bh // H
    q_base = Q + b.to(tl.int64) * s_qb + (bh % H).to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + ((bh % H) // G).to(tl.int64) * s_kh
    return q_base, k_base


@triton.jit
def _row_groups(q_base, offs_i, base, start, Sq, s_qs, s_qd, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[BM, STRIDE * HEAD_DIM]: each row group's rows side by side (rows outside the call: zeros)."""
    offs_c = tl.arange(0, STRIDE * HEAD_DIM)
    t = offs_c // HEAD_DIM
    rpos = base + offs_i[:, None] * STRIDE + t[None, :]
    ok = (rpos >= start) & (rpos < start + Sq)
    return tl.load(q_base + (rpos - start).to(tl.int64) * s_qs + (offs_c % HEAD_DIM)[None, :] * s_qd, mask=ok,
                   other=0.0)


@triton.jit
def _key_groups(k_base, offs_j, Sk, s_ks, s_kd, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[STRIDE * HEAD_DIM, BN]: each key group's keys last first, stacked (keys past the end: zeros)."""
    offs_c = tl.arange(0, STRIDE * HEAD_DIM)
    t = offs_c // HEAD_DIM
    kpos = offs_j[None, :] * STRIDE + (STRIDE - 1 - t)[:, None]
    return tl.load(k_base + kpos.to(tl.int64) * s_ks + (offs_c % HEAD_DIM)[:, None] * s_kd, mask=kpos < Sk,
                   other=0.0)


@triton.jit
def _chunk_product(q_base, k_base, offs_i, offs_j, c0, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd,
                   STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """[BM, BN] float32: the columns `c0 .. c0 + CHUNK` of the `STRIDE * WIDTH`-deep product, `CHUNK` dims of row
    offset `c0 // WIDTH` (`CHUNK` divides `WIDTH`). `WIDTH` is the head dim, or the head dim padded to a power of
    two (a whole row offset a step at head dim 96: the padding lanes load zeros)."""
    t = c0 // WIDTH
    offs_d = tl.multiple_of(c0 % WIDTH, CHUNK) + tl.arange(0, CHUNK)
    rpos = base + offs_i * STRIDE + t
    r_ok = (rpos >= start) & (rpos < start + Sq)
    kpos = offs_j * STRIDE + (STRIDE - 1 - t)
    if WIDTH == HEAD_DIM:
        q_ok = r_ok[:, None]
        k_ok = (kpos < Sk)[None, :]
    else:
        q_ok = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k_ok = (kpos < Sk)[None, :] & (offs_d < HEAD_DIM)[:, None]
    q = tl.load(q_base + (rpos - start)[:, None].to(tl.int64) * s_qs + offs_d[None, :] * s_qd, mask=q_ok, other=0.0)
    k = tl.load(k_base + kpos[None, :].to(tl.int64) * s_ks + offs_d[:, None] * s_kd, mask=k_ok, other=0.0)
    return tl.dot(q, k, input_precision=DOT_PRECISION)


@triton.jit
def _chunk_scores(q_base, k_base, offs_i, offs_j, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd,
                  STRIDE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
                  WIDTH: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BM, BN] float32, `CHUNK` of the `STRIDE * WIDTH`-deep product a step (`_chunk_product`): one flat loop of
    steps, which the compiler pipelines; with `CHUNK == WIDTH`, a whole row offset a step."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for c0 in range(0, STRIDE * WIDTH, CHUNK):
        acc += _chunk_product(q_base, k_base, offs_i, offs_j, c0, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd, STRIDE,
                              HEAD_DIM, WIDTH, CHUNK, DOT_PRECISION)
    return acc


@triton.jit
def _tile_scores(qg, q_base, k_base, offs_i, offs_j, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd, scale,
                 STRIDE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr,
                 GROUPED: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BM, BN] float32 scaled scores of a key tile: against the row groups `qg` loaded once (`GROUPED`), else
    `CHUNK` dims of a row offset a step (`_chunk_scores`)."""
    if GROUPED:
        sc = tl.dot(qg, _key_groups(k_base, offs_j, Sk, s_ks, s_kd, STRIDE, HEAD_DIM), input_precision=DOT_PRECISION)
    else:
        sc = _chunk_scores(q_base, k_base, offs_i, offs_j, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd, STRIDE, BM, BN,
                           HEAD_DIM, WIDTH, CHUNK, DOT_PRECISION)
    return sc * scale


@triton.jit(do_not_specialize=["start", "Sq", "Sk", "base", "n_groups", "H", "G"])
def _group_stats_kernel(
    Q, K, M, L,  # [B, H, Sq, D]; [B, H_kv, Sk, D]; [B*H, n_groups] f32 x2 (n_groups: the estimated ones)
    start, Sq, Sk, base, n_groups, H, G, scale,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
    STRIDE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
    GROUPED: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_STEP: tl.constexpr,
):
    bh = tl.program_id(0)
    i0 = tl.program_id(1) * BM
    offs_u = i0 + tl.arange(0, BM)  # estimated row groups: local group u * ROW_STEP + ROW_STEP - 1
    offs_i = offs_u * ROW_STEP + (ROW_STEP - 1)
    q_base, k_base = _head_bases(Q, K, bh, H, G, s_qb, s_qh, s_kb, s_kh)
    qg = 0.0  # the row groups, where loaded once
    if GROUPED:
        qg = _row_groups(q_base, offs_i, base, start, Sq, s_qs, s_qd, STRIDE, HEAD_DIM)
    g_abs = base // STRIDE + offs_i  # each row group's absolute index: its causal key groups are j <= g_abs
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    j_hi = tl.minimum(base // STRIDE + (i0 + BM) * ROW_STEP, (Sk + STRIDE - 1) // STRIDE)
    for j0 in range(0, j_hi, BN):
        offs_j = j0 + tl.arange(0, BN)
        sc = _tile_scores(qg, q_base, k_base, offs_i, offs_j, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd, scale,
                          STRIDE, BM, BN, HEAD_DIM, WIDTH, GROUPED, CHUNK, DOT_PRECISION)
        ok = (offs_j[None, :] <= g_abs[:, None]) & (offs_j[None, :] * STRIDE < Sk)
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(sc - m_safe[:, None]), 1)
        m = m_new
    out = bh.to(tl.int64) * n_groups + offs_u
    tl.store(M + out, m, mask=offs_u < n_groups)
    tl.store(L + out, l, mask=offs_u < n_groups)


@triton.jit(do_not_specialize=["start", "Sq", "Sk", "base", "n_groups", "H", "G", "qb0", "nQ", "nK"])
def _group_mass_kernel(
    Q, K, M, L, PRESENT, ROWS, OUT,  # ...; [B*H, n_groups] f32 x2; [n_groups] f32; [nQ - qb0] f32; [B, H, nQ, nK]
    start, Sq, Sk, base, n_groups, H, G, qb0, nQ, nK, scale,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
    STRIDE: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr, GROUPED: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROW_STEP: tl.constexpr,
):
    bh = tl.program_id(0)
    i0 = tl.program_id(1) * BM
    RS: tl.constexpr = R // ROW_STEP  # estimated row groups per query block
    offs_u = i0 + tl.arange(0, BM)
    offs_i = offs_u * ROW_STEP + (ROW_STEP - 1)
    q_base, k_base = _head_bases(Q, K, bh, H, G, s_qb, s_qh, s_kb, s_kh)
    qg = 0.0  # the row groups, where loaded once
    if GROUPED:
        qg = _row_groups(q_base, offs_i, base, start, Sq, s_qs, s_qd, STRIDE, HEAD_DIM)
    i_ok = offs_u < n_groups
    stat = bh.to(tl.int64) * n_groups + offs_u
    m = tl.load(M + stat, mask=i_ok, other=0.0)
    inv = 1.0 / tl.maximum(tl.load(L + stat, mask=i_ok, other=1.0), 1e-30)
    weight = inv * tl.load(PRESENT + offs_u, mask=i_ok, other=0.0)
    g_abs = base // STRIDE + offs_i
    qbs = qb0 + i0 // RS + tl.arange(0, BM // RS)
    rows = tl.load(ROWS + (qbs - qb0), mask=qbs < nQ, other=1.0)
    out_rows = OUT + (bh.to(tl.int64) * nQ + qbs[:, None]) * nK
    j_hi = tl.minimum(base // STRIDE + (i0 + BM) * ROW_STEP, (Sk + STRIDE - 1) // STRIDE)
    for j0 in range(0, j_hi, BN):
        offs_j = j0 + tl.arange(0, BN)
        sc = _tile_scores(qg, q_base, k_base, offs_i, offs_j, base, start, Sq, Sk, s_qs, s_qd, s_ks, s_kd, scale,
                          STRIDE, BM, BN, HEAD_DIM, WIDTH, GROUPED, CHUNK, DOT_PRECISION)
        ok = i_ok[:, None] & (offs_j[None, :] <= g_abs[:, None]) & (offs_j[None, :] * STRIDE < Sk)
        p = tl.where(ok, tl.exp(sc - m[:, None]) * weight[:, None], 0.0)
        acc = tl.sum(tl.sum(tl.reshape(p, (BM // RS, RS, BN // R, R)), 3), 1)
        kbs = j0 // R + tl.arange(0, BN // R)
        tl.store(out_rows + kbs[None, :], acc / rows[:, None], mask=(qbs[:, None] < nQ) & (kbs[None, :] < nK))


def supports(q: torch.Tensor, block: int, stride: int) -> bool:
    """Whether `antisum_block_mass` runs here: CUDA tensors of a float dtype, `block // stride` a power of two
    at most `TILES["bm"] // 2` (the tile reshape), a head dim of at most 256."""
    r = block // stride if stride and block % stride == 0 else 0
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and r > 0 and r & (r - 1) == 0
            and r <= TILES["bm"] // 2 and q.shape[-1] <= 256)


_FAILED: list[tuple[dict, bool]] = []  # the (settings, one pass) this device could not build, once known


def default_tiles(head_dim: int, element_size: int) -> dict:
    """The launch setting `antisum_block_mass` takes unless told (module doc), its chunk `bk` (if any) shrunk to the
    largest power of two that divides the head dim, none below 16 (a row offset a step)."""
    if element_size == 2 and head_dim <= 64:
        t = dict(NARROW_TILES)
    else:
        t = dict(WIDE_HEAD_TILES) if head_dim > 128 else dict(TILES)
    bk = t.get("bk") or 0
    while bk and head_dim % bk:
        bk //= 2
    if "bk" in t:
        t["bk"] = bk if bk >= 16 else 0
    return t


def estimate_or_reference(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                          scale: float | None = None, row_step: int = 1) -> torch.Tensor:
    """`antisum_block_mass` at its default setting, else at `TILES`, each in one pass (`ONE_PASS`) and else in
    two, else its PyTorch reference (the same numbers up to rounding) where Triton cannot build any of them for
    this device (a compilation error or too little shared memory): a setting that failed is not tried again,
    and the reference is said once on stderr. Other errors are raised."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from .block_mass import antisum_block_mass as reference

    passes = (True, False) if ONE_PASS and row_step <= 1 else (False,)
    for tiles in (default_tiles(q.shape[-1], q.element_size()), TILES):
        for one_pass in passes:
            if (tiles, one_pass) in _FAILED:
                continue
            try:
                return antisum_block_mass(q, k, start, block, stride, scale, tiles=tiles, row_step=row_step,
                                          one_pass=one_pass)
            except (CompilationError, OutOfResources) as e:
                _FAILED.append((tiles, one_pass))
                if tiles == TILES and one_pass is passes[-1]:
                    import sys

                    print(f"dam: the summed-antidiagonal kernel could not be built here ({type(e).__name__}: "
                          f"{str(e).strip()[-200:]}); using its PyTorch reference (the same estimate, slower)",
                          file=sys.stderr)
    return reference(q, k, start, block, stride, scale, row_step)


def launch_setting(q: torch.Tensor, tiles: dict | None, stride: int, bm_min: int, bn_min: int):
    """`(tiles, bm, bn, grouped, chunk, width, dot precision)` of a launch of the summed estimate: `default_tiles`
    unless `tiles` changes `TILES`, the tile sizes at least `bm_min` row groups and `bn_min` key groups, the row
    groups loaded once where they fit (`grouped`; 2-byte inputs unless `tiles` says), else `chunk` dims of a row
    offset a step: `tiles["bk"]` where set (it must divide the head dim; `width` is then the head dim), else a whole
    row offset (`chunk` and `width` the head dim padded to a power of two); products in the inputs' precision."""
    D = q.shape[-1]
    t = default_tiles(D, q.element_size()) if tiles is None else {**TILES, **tiles}
    bm, bn = max(t["bm"], bm_min), max(t["bn"], bn_min)
    wide = grouped(bm, stride, D) and (q.element_size() == 2 if t.get("grouped") is None else bool(t["grouped"]))
    chunk = int(t.get("bk") or 0)
    if chunk and (chunk < 16 or chunk & (chunk - 1) or D % chunk):
        raise ValueError(f"the summed estimate's chunk bk={chunk} must be a power of two of at least 16 that divides "
                         f"the head dim {D}")
    width = D if chunk else triton.next_power_of_2(D)
    return t, bm, bn, wide, chunk or width, width, "ieee" if q.dtype == torch.float32 else "tf32"


def grouped(bm: int, stride: int, head_dim: int) -> bool:
    """Whether a tile of `bm` row groups can be loaded once (module doc): `stride * head_dim` a power of two, at most
    `GROUP_ELEMENTS` elements in the tile. The launcher takes that path by default for 2-byte inputs only (float32
    tiles of that size, with the key tiles beside them, exceed an H100's shared memory)."""
    width = stride * head_dim
    return width & (width - 1) == 0 and bm * width <= GROUP_ELEMENTS


def antisum_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                       scale: float | None = None, tiles: dict | None = None, row_step: int = 1,
                       one_pass: bool | None = None) -> torch.Tensor:
    """`dam_kernels.block_mass.antisum_block_mass` in two Triton launches (module doc): float32 `[B, H, nQ, nK]`.
    `tiles` replaces `default_tiles(D, ...)` by `TILES` with these keys changed (bm, bn, warps, stages, and
    `grouped` to force either path where both fit; without it the row groups are loaded once where they fit, for
    2-byte inputs); the result does not depend on the setting beyond float rounding. `one_pass` (default
    `ONE_PASS`): with `row_step` 1, `dam_kernels.antisum_partials` (the same estimate, each product taken once)."""
    from .block_mass import antidiag_blocks, group_presence

    if (ONE_PASS if one_pass is None else one_pass) and row_step <= 1:
        from .antisum_partials import antisum_block_mass as partials

        return partials(q, k, start, block, stride, scale, tiles=tiles)

    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    qb0, nQ, nK, scale = antidiag_blocks(q, k, start, block, stride, scale)
    base, R = qb0 * block, block // stride
    n_groups = (nQ - qb0) * R
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    present, rows = group_presence(start, Sq, qb0, nQ, block, stride, q.device, row_step)
    # Only the sampled row groups are computed, unless a block fell back to all its groups (a call ending mid-block
    # before its first sampled group): then every group is, the others weighted 0.
    step = min(row_step, R)
    step = step if step > 1 and R % step == 0 and not present.view(-1, step)[:, :-1].any() else 1
    present = present.float()[step - 1::step].contiguous()
    n_groups //= step
    t, bm, bn, wide, chunk, width, precision = launch_setting(q, tiles, stride, 2 * (R // step), R)
    stats = torch.empty(2, B * H, n_groups, dtype=torch.float32, device=q.device)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float32, device=q.device)
    common = dict(STRIDE=stride, BM=bm, BN=bn, WIDTH=width, HEAD_DIM=D, GROUPED=wide,
                  CHUNK=chunk, DOT_PRECISION=precision, ROW_STEP=step, num_warps=t["warps"],
                  num_stages=t["stages"])
    strides = (*q.stride(), *k.stride())
    sc = float(scale) / stride
    grid = (B * H, triton.cdiv(n_groups, bm))
    _group_stats_kernel[grid](q, k, stats[0], stats[1], start, Sq, Sk, base, n_groups, H, H // H_kv, sc, *strides,
                              **common)
    _group_mass_kernel[grid](q, k, stats[0], stats[1], present, rows, out, start, Sq, Sk, base, n_groups, H,
                             H // H_kv, qb0, nQ, nK, sc, *strides, R=R, **common)
    return out
