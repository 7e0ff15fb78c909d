"""Triton prefill kernel for DAM attention: block-sparse flash attention with an exact element mask.

One program computes one (batch, query head, query block) tile with the online softmax of
FlashAttention-2, visiting only the key blocks its layout lists (`kernels/layout.py`): first the
"full" blocks with no mask at all, then the "partial" blocks, where the Stage-2 element mask is
evaluated in registers from the profile's bitmaps: one 64-bit word per tile row (of `M` below L,
of the matched offsets `R` beyond L; causal rule and diagonal guard folded in) plus the
matched columns `C`, so the mask costs a shift and an `and` per element instead of gathers.
Grouped-query heads read their shared kv head through the strides. Options, each a constexpr so
the default path compiles unchanged: a sliding window (`i - j < W`), logit soft-capping
(`c * tanh(s / c)`), and head dims that are not a power of two (96: padded to 128 with masked
loads). File order follows Triton tutorial 06: jit helpers and kernel, then the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # head dims the kernels take (96 runs padded to 128)


@triton.jit
def softcap_scores(qk, cap_in, cap_out):
    """`cap_out * tanh(qk * cap_in)` elementwise: with `cap_in = scale / c` and `cap_out = c * log2(e)`
    it is Gemma 2's capped score `c * tanh(scale * qk / c)` in log2 units. tanh from one exp2
    (libdevice has no interpreter version): `(1 - t) / (1 + t)`, `t = exp(-2|x|)`, never overflows."""
    x = qk * cap_in
    t = tl.math.exp2(tl.abs(x) * (-2.0 * 1.4426950408889634))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y) * cap_out


@triton.jit
def dam_block_mask(i, k0, t, mw_off, ow_off, c_off, MW, OW, C, L, NW, WL):
    """Stage-2 mask of rows `i` ([R] int32) against keys `k0 + t` (`t` [N]) as bool [R, N].

    The key block must sit inside one 64-key word (`k0` a multiple of the block width, which
    divides 64). Each row costs one word load: rows below L read `M` (guard included) from
    `MW` ([H, L, NW] int64), rows at or beyond L read their offsets from `OW` ([H, WL] int64,
    word index `i - k0`); matched columns `C` ([H, L] uint8) add keys below L for rows beyond
    L. `mw_off`, `ow_off` are the head offsets, scalars or [R] for per-row heads; `c_off` is a
    scalar or [R, 1].
    Every load is masked, so no address outside the tables is touched.
    """
    below = i < L
    # (i * 0 + k0) keeps the mask a vector: the interpreter rejects vector & scalar masks.
    mw = tl.load(MW + mw_off + i * NW + (k0 >> 6), mask=below & ((i * 0 + k0) < L), other=0)
    e = i - k0
    ow = tl.load(OW + ow_off + e, mask=(~below) & (e >= 0) & (e < WL), other=0)
    word = tl.where(below, mw, ow)  # [R] int64
    shift = tl.where(below, k0 & 63, 0)
    bits = (word[:, None] >> (shift[:, None] + t[None, :]).to(tl.int64)) & 1
    j = k0 + t
    cbit = tl.load(C + c_off + j[None, :], mask=j[None, :] < L, other=0)
    return (bits != 0) | ((cbit != 0) & (~below)[:, None])


@triton.jit
def dam_tile_mask(i, k0, mw_off, ow_off, c_off, MW, OW, C, L, NW, WL, BLOCK_N: tl.constexpr):
    """`dam_block_mask` over a key tile of `BLOCK_N` keys from `k0`; a 128-key tile is two
    64-key words side by side (mask words hold 64 keys)."""
    if BLOCK_N <= 64:
        return dam_block_mask(i, k0, tl.arange(0, BLOCK_N), mw_off, ow_off, c_off, MW, OW, C, L, NW, WL)
    else:
        t = tl.arange(0, 64)
        lo = dam_block_mask(i, k0, t, mw_off, ow_off, c_off, MW, OW, C, L, NW, WL).to(tl.int8)
        hi = dam_block_mask(i, k0 + 64, t, mw_off, ow_off, c_off, MW, OW, C, L, NW, WL).to(tl.int8)
        both = tl.permute(tl.join(lo, hi), (0, 2, 1))  # [R, 2, 64]: key k0 + 64 * half + t
        return tl.reshape(both, (lo.shape[0], 2 * 64)) != 0


# Arguments that change with the length or the chunk: not specialised (a new length must not
# mean a new compile; divisibility of these scalars does not change the generated code's loads).
_PREFILL_VARYING = ["start", "Sq", "Sk", "qb0", "s_pnh", "s_pnq", "s_pih", "s_piq", "s_fnh", "s_fnq", "s_fih", "s_fiq"]


@triton.jit(do_not_specialize=_PREFILL_VARYING)
def _dam_prefill_kernel(
    Q, K, V, Out,  # [B, H, Sq, D], [B, H_kv, Sk, D] x2, [B, H, Sq, D]
    MW, OW, C,  # [H, L, NW] int64, [H, L + 64] int64, [H, L] uint8 (word_tables.DeviceMasks)
    PART_NUM, PART_IDX, FULL_NUM, FULL_IDX,  # [H, nQ] int32, [H, nQ, maxP] int32, idem full
    qk_scale, start, Sq, Sk, L, NW, H, G, qb0,
    window, cap_in, cap_out,  # HAS_WINDOW: keys j > i - window only; HAS_SOFTCAP: see softcap_scores
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    s_pnh, s_pnq, s_pih, s_piq,
    s_fnh, s_fnq, s_fih, s_fiq,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, QB_MAJOR: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    # Heaviest (latest) query blocks first, so the tail of the grid holds the short ones.
    # Programs start in order of x + y * grid_x. QB_MAJOR (short sequences, few waves): the query
    # block is the slow axis, so every head's latest block starts before any earlier one. Else
    # (long sequences, many waves): the head is the slow axis, so the programs in flight share
    # one kv head's keys in L2, and heaviest-first holds within each head.
    if QB_MAJOR:
        qb = qb0 + tl.num_programs(1) - 1 - tl.program_id(1)
        bh = tl.program_id(0)
    else:
        qb = qb0 + tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # absolute query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D > HEAD_DIM (96 -> 128): the padding lanes load zeros
    d_ok = offs_d < HEAD_DIM
    q_row = offs_m - start
    row_ok = (q_row >= 0) & (q_row < Sq)

    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + kvh.to(tl.int64) * s_vh
    q = tl.load(q_base + q_row[:, None] * s_qs + offs_d[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    # Tile offsets computed once; each key block only adds a scalar.
    kt_offs = offs_n[None, :] * s_ks + offs_d[:, None] * s_kd  # [D, N]
    v_offs = offs_n[:, None] * s_vs + offs_d[None, :] * s_vd  # [N, D]
    if USE_TMA:  # Hopper's bulk copy engine: no address math, rows past Sk come back as zeros
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, HEAD_DIM], strides=[s_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, HEAD_DIM], strides=[s_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full blocks: every pair allowed and every key below Sk (layout contract): no mask, no bounds.
    # Under a window a full block may cross the window's edge only in a layout not built for this
    # window (`layout.window_layout` drops the blocks left of it and demotes the crossing ones to
    # partial; `dynamic.merge_layout` adds full blocks anywhere): one scalar test per block keeps
    # such a block exact by masking it per element, at no cost to the others.
    q_last = qb * BLOCK_M + BLOCK_M - 1
    n_full = tl.load(FULL_NUM + h * s_fnh + qb * s_fnq)
    full_row = FULL_IDX + h * s_fih + qb * s_fiq
    for t in range(0, n_full):
        kb = tl.load(full_row + t)
        k0 = kb * BLOCK_N
        if USE_TMA:
            k = k_desc.load([k0, 0]).T
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_base + k0 * s_ks + kt_offs, mask=d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + k0 * s_ks + kt_offs)  # [D, N]
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            qk = softcap_scores(qk, cap_in, cap_out)
        if HAS_WINDOW:
            if q_last - k0 >= window:
                qk = tl.where((k0 + offs_n)[None, :] > offs_m[:, None] - window, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = m_new
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_desc.load([k0, 0])
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_base + k0 * s_vs + v_offs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + k0 * s_vs + v_offs)  # [N, D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # Partial blocks: the exact Stage-2 element mask, plus key bounds (and the window).
    n_part = tl.load(PART_NUM + h * s_pnh + qb * s_pnq)
    part_row = PART_IDX + h * s_pih + qb * s_piq
    WL = L + 64
    mw_off = h * L * NW
    ow_off = h * WL
    c_off = h * L
    for t in range(0, n_part):
        kb = tl.load(part_row + t)
        keys = kb * BLOCK_N + offs_n
        key_ok = keys < Sk
        allowed = dam_tile_mask(offs_m, kb * BLOCK_N, mw_off, ow_off, c_off, MW, OW, C, L, NW, WL, BLOCK_N)
        allowed = allowed & key_ok[None, :]
        if HAS_WINDOW:
            allowed = allowed & (keys[None, :] > offs_m[:, None] - window)
        if USE_TMA:
            k = k_desc.load([kb * BLOCK_N, 0]).T
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_base + (kb * BLOCK_N) * s_ks + kt_offs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + (kb * BLOCK_N) * s_ks + kt_offs, mask=key_ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            qk = softcap_scores(qk, cap_in, cap_out)
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row with nothing allowed yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_desc.load([kb * BLOCK_N, 0])
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_base + (kb * BLOCK_N) * s_vs + v_offs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + (kb * BLOCK_N) * s_vs + v_offs, mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows outside [start, start+Sq) are never stored; their l may be 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = Out + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    tl.store(o_base + q_row[:, None] * s_os + offs_d[None, :] * s_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


QB_MAJOR_MAX_BLOCKS = 64  # query blocks up to which the grid runs query-block-major (see dam_prefill)
_ALLOCATOR_SET = []


def prefill_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for the prefill kernel on a GPU. Head dim 256 takes 64 x 64 tiles: a
    128-row tile's float32 accumulator alone would be 128 registers a thread at 8 warps, and two
    stages of 64 x 256 K and V tiles (bf16: 2 x 2 x 32 KiB) plus Q (32 KiB) fit an H100/H200's
    227 KiB of shared memory. Others: 128 x 64, the best of the H200 sweep at head dims 64 and 128."""
    return (64, 64) if head_dim > 128 else (128, 64)


def stages_that_fit(wanted: int, block_n: int, block_d: int, elem_bytes: int, smem_bytes: int) -> int:
    """The most pipeline stages, at most `wanted`, whose K and V buffers fit `smem_bytes` of shared memory.

    The kernel has two key loops (partial and full blocks), and the compiler gives each its own
    `stages` buffers of a K and a V tile: 4 x stages x BLOCK_N x BLOCK_D x bytes, plus a little for
    barriers. At head dim 256 in bf16 with 64-key tiles, two stages ask for 263,256 bytes, over an
    H200's 232,448 (seen in `dam eval` on Gemma 3): such tiles run with one stage."""
    per_stage = _stage_bytes(block_n, block_d, elem_bytes)
    stages = wanted
    while stages > 1 and stages * per_stage + _SMEM_SLACK > smem_bytes:
        stages -= 1
    return stages


def prefill_fits(head_dim: int, elem_bytes: int, smem_bytes: int) -> bool:
    """Whether the prefill kernel's tiles (`prefill_blocks`) fit `smem_bytes` of shared memory with one stage
    (float32 at head dim 256 does not on an H100/H200)."""
    block_n = prefill_blocks(head_dim)[1]
    return _stage_bytes(block_n, triton.next_power_of_2(head_dim), elem_bytes) + _SMEM_SLACK <= smem_bytes


def _stage_bytes(block_n: int, block_d: int, elem_bytes: int) -> int:
    """Shared memory of one pipeline stage: a K and a V tile in each of the kernel's two key loops."""
    return 4 * block_n * block_d * elem_bytes


_SMEM_SLACK = 4096  # bytes beside the K and V buffers (barriers, the compiler's scratch); 1,112 were seen


def smem_bytes(device: torch.device) -> int:
    """Shared memory one program may use on `device` (an H100/H200's 232,448 bytes where unknown)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 232448))


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from a host allocator (set once)."""
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
        _ALLOCATOR_SET.append(True)


def _tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    if not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    if not hasattr(tl, "make_tensor_descriptor") or k.shape[-1] != triton.next_power_of_2(k.shape[-1]):
        return False
    for t in (k, v):
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def softcap_args(scale: float, softcap: float | None) -> tuple[float, float, float]:
    """(qk_scale, cap_in, cap_out) for the kernels: the scale folds into the cap when one is set."""
    if softcap is None:
        return scale * LOG2E, 1.0, 1.0
    assert softcap > 0, "softcap must be positive"
    return 1.0, scale / softcap, softcap * LOG2E


def dam_prefill(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    v: torch.Tensor,  # [B, H_kv, Sk, D]
    masks,  # word_tables.DeviceMasks of this layer, on q's device
    layout,  # layout.BlockLayout for length Sk, on q's device
    *,
    start: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """DAM attention of query rows `start .. start+Sq-1` over keys `0 .. Sk-1` (`Sk = start+Sq`).

    `window` = W keeps key `j` for row `i` only if `i - j < W`; `softcap` = c caps the scaled scores
    to `c * tanh(s / c)`. Any layout of the profile is exact under a window; one from
    `layout_for(..., window=W)` skips the blocks left of it. Inputs are checked by
    `dam_cli.runtime.attention`; the asserts guard the kernel's own contract.
    Returns `[B, H, Sq, D]` in q's dtype, accumulated in float32.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    assert Sk == start + Sq and H % H_kv == 0 and v.shape == k.shape
    assert layout.length == Sk and layout.n_heads == H
    assert D in HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert window is None or window >= 1, "window must be at least 1"
    lay_window = getattr(layout, "window", None)
    assert lay_window is None or lay_window == window, f"layout built for window {lay_window}, not {window}"
    BM, BN = layout.block_m, layout.block_n
    assert BN in (16, 32, 64, 128), "a key block is at most two 64-bit mask words"
    BD = triton.next_power_of_2(D)
    out = torch.empty_like(q)
    qb0 = start // BM
    n_qb = (Sk - 1) // BM - qb0 + 1
    if use_tma is None:
        use_tma = _tma_ok(k, v)
    elif use_tma:
        assert _tma_ok(k, v), "TMA needs Hopper or newer, unit last stride, 16-byte aligned rows, a power-of-2 D"
    # Measured on an H200 (docs/results/kernel-speed.md), 128x64 tiles, D=128: mostly-full layouts run
    # best on 4 warps, 2 stages with TMA (8 warps, 3 stages with pointer loads); mostly-partial
    # layouts (DAM's bands) on 8 warps, 3 stages, which spread the mask work. D=64: 4 warps, 2.
    # D=256 (64x64 tiles, prefill_blocks): 4 warps, one stage (stages_that_fit); on an H100 with TMA, random
    # layouts of 10% (32K) and 20% (16K) of the blocks: 0.551 / 0.287 ms against 8 warps' 1.1 / 0.579 ms
    # (docs/data/kernels-window-headdims/sweep-head256-*.json).
    share = getattr(layout, "partial_share", None)
    wide = q.is_cuda and BM >= 128 and BD >= 128 and (not use_tma or (share is not None and share > 0.5))
    if num_warps is None:
        num_warps = 8 if wide else 4
    if num_stages is None:
        wanted = 3 if wide and BD <= 128 else 2
        num_stages = stages_that_fit(wanted, BN, BD, k.element_size(), smem_bytes(q.device)) if q.is_cuda else wanted
    if use_tma:
        _ensure_allocator()
    # Measured on the H200 (docs/results/kernel-speed.md, runs 6 and 7): query-block-major order wins
    # on all-causal layouts at 8,192 tokens (1.26 -> 1.19x cuDNN at D=128) and loses at 32K and
    # beyond, most on sparse layouts (L2 locality: 0.79 -> 0.99x Flex at 10%, 131K, D=128).
    qb_major = n_qb <= QB_MAJOR_MAX_BLOCKS
    grid = (B * H, n_qb) if qb_major else (n_qb, B * H)
    pn, pi, fn, fi = layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices
    qk_scale, cap_in, cap_out = softcap_args(scale, softcap)
    _dam_prefill_kernel[grid](
        q, k, v, out,
        masks.mask_words, masks.offset_words, masks.columns,
        pn, pi, fn, fi,
        qk_scale, start, Sq, Sk, masks.pcl, masks.mask_words.shape[-1], H, H // H_kv, qb0,
        window or 0, cap_in, cap_out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        pn.stride(0), pn.stride(1), pi.stride(0), pi.stride(1),
        fn.stride(0), fn.stride(1), fi.stride(0), fi.stride(1),
        BLOCK_M=BM, BLOCK_N=BN, HEAD_DIM=D, BLOCK_D=BD,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=use_tma, QB_MAJOR=qb_major,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
