"""Triton decode kernel for DAM attention: a few query rows over a long KV cache, split-K.

A row at position `t >= L` can only reach keys below `L` (matched columns) and keys in
`(t - L, t]` (matched offsets and the diagonal), so the candidate key blocks are those two
ranges, whatever the cache length: `[0, L)` and `[max(L, start - L + 1), Sk)`, both cut to the
keys `> start - W` under a sliding window W (whose edge the element mask applies). The candidates
are cut into splits (flash-decoding), one program per (split, batch, kv head) so a single query
fills the GPU; each program evaluates the element mask of a block first and loads its keys and
values only if some pair is allowed. A second kernel merges the splits' partial softmaxes.

The tile rows are the `G x Sq` (query head of the kv group, query position) pairs, so the keys
and values of a kv head are read once for all its query heads; each row carries its own head,
hence its own mask. Soft-capping and head dims 96 (padded to 128) and 256 as in `prefill.py`.
File order: jit kernels, then the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .prefill import HEAD_DIMS, dam_block_mask, softcap_args, softcap_scores


@triton.jit(do_not_specialize=["start", "Sq", "Sk", "kb1", "nb1", "kb2", "n_cand", "blocks_per_split",
                               "n_splits", "n_kd", "max_extra", "kbw"])
def _dam_decode_split_kernel(
    Q, K, V,  # [B, H, Sq, D], [B, H_kv, Sk, D] x2
    MW, OW, C,  # [H, L, NW] int64, [H, L + 64] int64, [H, L] uint8 (word_tables.DeviceMasks)
    O_PART, ML_PART,  # [B*H_kv, n_splits, BLOCK_R, D] f32, [B*H_kv, n_splits, 2, BLOCK_R] f32
    NVALID,  # [1] int64 on the device: filled cache slots (DEVICE_POS), else unused
    DYN, EXTRA, EXTRA_NUM,  # HAS_DYN: [B, H, nKd] uint8, [B*H_kv, max_extra] int32, [B*H_kv] int32
    FULL,  # HAS_FULL: [H] uint8, the heads on full attention
    qk_scale, start, Sq, Sk, L, NW, H_kv, G,
    kb1, nb1, kb2, n_cand, blocks_per_split, n_splits,  # candidates: blocks [kb1, nb1), then from kb2
    n_kd, dyn_block, max_extra,
    window, cap_in, cap_out,  # HAS_WINDOW: keys j > i - window only; HAS_SOFTCAP: see softcap_scores
    kbw,  # HAS_FULL: the first block of a full group's sweep (the first row's window), set on the device too
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DEVICE_POS: tl.constexpr, HAS_DYN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_FULL: tl.constexpr,
):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    if DEVICE_POS:
        # A static cache under a CUDA graph: the fill level is read here, never on the host,
        # and the grid covers the most candidates any position can have (see dam_decode).
        Sk = tl.load(NVALID).to(tl.int32)
        start = Sk - Sq
        lo = tl.maximum(L, start - L + 1)
        if HAS_WINDOW:
            kb1 = tl.minimum(tl.maximum(start - window + 1, 0) // BLOCK_N, nb1)
            lo = tl.maximum(lo, start - window + 1)
        kb2 = tl.maximum(nb1, lo // BLOCK_N)
        n_cand = nb1 - kb1 + tl.maximum(0, tl.cdiv(Sk, BLOCK_N) - kb2)
        if HAS_WINDOW:
            kbw = tl.maximum(start - window + 1, 0) // BLOCK_N
    b = bk // H_kv
    kvh = bk % H_kv
    r = tl.arange(0, BLOCK_R)
    row_ok = r < G * Sq
    g = tl.where(row_ok, r // Sq, 0)
    s = tl.where(row_ok, r % Sq, 0)
    h = kvh * G + g  # [BLOCK_R] query head of each tile row
    i = start + s  # [BLOCK_R] absolute position of each tile row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D > HEAD_DIM (96 -> 128): the padding lanes load zeros
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b.to(tl.int64) * s_qb + h[:, None].to(tl.int64) * s_qh + s[:, None] * s_qs + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + kvh.to(tl.int64) * s_vh
    WL = L + 64
    mw_off = h * L * NW
    ow_off = h * WL
    c_off = (h * L)[:, None]

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n1 = nb1 - kb1
    n_own = n_cand + max_extra if HAS_DYN else n_cand  # this group's candidate slots
    if HAS_FULL:
        # A group with a head on full attention sweeps blocks kbw .. of the cache instead; every group
        # spreads its own count over the splits.
        full_row = tl.load(FULL + h, mask=row_ok, other=0) != 0
        sweep = tl.max(full_row.to(tl.int32), 0) > 0
        n_own = tl.where(sweep, tl.cdiv(Sk, BLOCK_N) - kbw, n_own)
        blocks_per_split = tl.cdiv(n_own, n_splits)
    c_lo = split * blocks_per_split
    c_hi = tl.minimum(c_lo + blocks_per_split, n_own)
    if HAS_DYN:
        n_extra = tl.load(EXTRA_NUM + bk)
    for c in range(c_lo, c_hi):
        kb = tl.where(c < n1, kb1 + c, c - n1 + kb2)
        if HAS_DYN:
            # Candidates past the static ones are the blocks the dynamic part selected for some
            # head of this kv group (outside the static ranges); unused slots have no block.
            e = c - n_cand
            slot = tl.minimum(tl.maximum(e, 0), max_extra - 1)  # always inside the table
            kb_e = tl.load(EXTRA + bk * max_extra + slot)
            kb = tl.where(c < n_cand, kb, kb_e)
            cand_ok = (c < n_cand) | (e < n_extra)
        else:
            cand_ok = c < n_cand
        if HAS_FULL:
            kb = tl.where(sweep, kbw + c, kb)
            cand_ok = cand_ok | sweep
        keys = kb * BLOCK_N + offs_n
        key_ok = keys < tl.where(cand_ok, Sk, 0)  # no keys for an unused candidate slot
        allowed = dam_block_mask(i, kb * BLOCK_N, offs_n, mw_off, ow_off, c_off, MW, OW, C, L, NW, WL)
        if HAS_DYN:
            # A selected block allows every causal pair of the rows whose head selected it.
            kd = h * 0 + (kb * BLOCK_N) // dyn_block  # a vector: the interpreter rejects vector & scalar masks
            d = tl.load(DYN + (b * (H_kv * G) + h) * n_kd + kd, mask=row_ok & (kd < n_kd), other=0)
            allowed = allowed | ((d != 0)[:, None] & (keys[None, :] <= i[:, None]))
        if HAS_FULL:
            allowed = allowed | (full_row[:, None] & (keys[None, :] <= i[:, None]))
        allowed = allowed & key_ok[None, :] & row_ok[:, None]
        if HAS_WINDOW:
            allowed = allowed & (keys[None, :] > i[:, None] - window)
        # Skip the key/value traffic of blocks where nothing is allowed.
        if tl.max(tl.max(allowed.to(tl.int32), 1), 0) > 0:
            k_ptrs = k_base + keys[None, :] * s_ks + offs_d[:, None] * s_kd
            v_ptrs = v_base + keys[:, None] * s_vs + offs_d[None, :] * s_vd
            if BLOCK_D != HEAD_DIM:
                k = tl.load(k_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            if HAS_SOFTCAP:
                qk = softcap_scores(qk, cap_in, cap_out)
            else:
                qk = qk * qk_scale
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if BLOCK_D != HEAD_DIM:
                v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

    part = (bk * n_splits + split).to(tl.int64)
    # Only the tile's real rows: the combine reads no other.
    tl.store(O_PART + part * BLOCK_R * BLOCK_D + r[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(ML_PART + part * 2 * BLOCK_R + r, m_i, mask=row_ok)
    tl.store(ML_PART + part * 2 * BLOCK_R + BLOCK_R + r, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["Sq", "n_splits"])
def _dam_decode_combine_kernel(
    O_PART, ML_PART, Out,  # partials as above; Out [B, H, Sq, D]
    Sq, H_kv, G, n_splits,
    s_ob, s_oh, s_os, s_od,
    BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):
    # One program per (batch and kv head, query row). The splits are read SPLITS at a time, as one wide load:
    # a loop over them one by one waits on memory once per split (about 125 us for 150 splits of a 256-wide
    # row on an H100, one program per kv head), where here it waits once per SPLITS of them.
    bk = tl.program_id(0)
    r = tl.program_id(1)  # < G * Sq
    b = bk // H_kv
    kvh = bk % H_kv
    sp = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    first = bk.to(tl.int64) * n_splits
    m = tl.full([], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, SPLITS):  # the rows' maximum over every split
        ok = s0 + sp < n_splits
        m_s = tl.load(ML_PART + (first + s0 + sp) * 2 * BLOCK_R + r, mask=ok, other=float("-inf"))
        m = tl.maximum(m, tl.max(m_s, 0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_acc = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_splits, SPLITS):
        ok = s0 + sp < n_splits
        part = first + s0 + sp
        m_s = tl.load(ML_PART + part * 2 * BLOCK_R + r, mask=ok, other=float("-inf"))
        l_s = tl.load(ML_PART + part * 2 * BLOCK_R + BLOCK_R + r, mask=ok, other=0.0)
        c = tl.math.exp2(m_s - m_safe)  # 0 for a split that saw no key (m_s = -inf; its partial output is 0)
        l_acc += tl.sum(l_s * c, 0)
        o_s = tl.load(O_PART + (part * BLOCK_R + r)[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None],
                      other=0.0)
        acc += tl.sum(o_s * c[:, None], 0)
    g = r // Sq
    s = r % Sq
    h = kvh * G + g
    out = acc / tl.where(l_acc == 0.0, 1.0, l_acc)
    o_ptrs = Out + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + s * s_os + offs_d * s_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


_SM_COUNT: dict = {}
# Programs of the full groups' sweeps, in units of `programs_wanted`: 1, 2, 4 and 8 took 0.949, 0.961, 0.986 and
# 0.993 ms a 16-layer decode step at 131K on an H100 (benchmarks/decode_step.py --sweep).
FULL_SWEEP_PROGRAMS = 1
MAX_SPLITS = 256  # every split writes a partial of each row, the empty ones too: the combine reads them all


def programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter runs programs one by one: few splits keep tests fast
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def dam_decode(
    q: torch.Tensor,  # [B, H, Sq, D], Sq small (G * Sq <= 128)
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    v: torch.Tensor,  # [B, H_kv, Sk, D]
    masks,  # word_tables.DeviceMasks of this layer, on q's device
    *,
    start: int,
    scale: float,
    block_n: int = 64,
    num_warps: int = 4,
    valid_len: torch.Tensor | None = None,
    dyn: torch.Tensor | None = None,
    dyn_block: int = 0,
    max_extra: int = 0,
    extra: tuple | None = None,
    window: int | None = None,
    softcap: float | None = None,
    full: torch.Tensor | None = None,
    full_groups: int | None = None,
) -> torch.Tensor:
    """DAM attention of a few query rows `start .. start+Sq-1` over keys `0 .. Sk-1`.

    Visits only key blocks in `[0, L)` and `[max(L, start-L+1), Sk)` (the only reachable ones),
    skipping blocks whose element mask is empty. Returns `[B, H, Sq, D]` in q's dtype.

    `valid_len` (a one-element int64 tensor on q's device) makes k and v a static cache: only
    its first `valid_len` slots hold keys, the rows are `valid_len-Sq .. valid_len-1`, and
    `start` is ignored. Nothing is read on the host and the launch does not depend on the
    position, so the call can be captured in a CUDA graph and replayed at every step.

    `dyn` (bool `[B, H, ceil(Sk / dyn_block)]`, the dynamic part's selection for the query block
    of these rows, `dam_kernels.dynamic.select_blocks_one`) adds every causal pair of the selected
    key blocks of each head. `max_extra` bounds the selected blocks of `block_n` keys per kv
    group outside the static candidates (topk x G x dyn_block / block_n always suffices).
    `extra` (instead of `dyn`): the selection already in the kernel's form, `(dyn uint8, extra_idx,
    extra_num, max_extra)` from `dam_kernels.select.select_extra` (two launches, no torch chain).
    `window` = W keeps key `j` for row `i` only if `i - j < W` (after the dynamic part's blocks
    join); `softcap` = c caps the scaled scores to `c * tanh(s / c)`.
    `full` (uint8 `[H]` on q's device, None when no head is): the heads on full attention, whose rows
    allow every causal key (within the window); their kv groups sweep every block of the cache.
    `full_groups`: how many kv groups of a batch row hold such a head; the splits are sized so that those
    groups' sweeps alone fill the GPU (None: counted from `full`, a read on the host).
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    device_pos = valid_len is not None
    assert (device_pos or Sk == start + Sq) and H % H_kv == 0 and v.shape == k.shape
    assert D in HEAD_DIMS and G * Sq <= 128 and block_n in (16, 32, 64)
    assert window is None or window >= 1, "window must be at least 1"
    L = masks.pcl
    BD = triton.next_power_of_2(D)
    BLOCK_R = max(16, triton.next_power_of_2(G * Sq))
    BN = block_n
    if device_pos:
        # Any position's candidates: the blocks of [0, L) and at most L + Sq - 1 keys of the
        # recent window, which straddle at most (L + Sq - 2) // BN + 2 blocks.
        # (A window only shrinks both ranges; the kernel cuts them on the device.)
        start = kb1 = 0
        nb1 = triton.cdiv(L, BN)
        kb2 = nb1
        n_cand = nb1 + (L + Sq - 2) // BN + 2
    else:
        n_kb = triton.cdiv(Sk, BN)
        nb1 = min(triton.cdiv(L, BN), n_kb)
        lo = max(L, start - L + 1)
        kb1 = 0
        if window is not None:  # keys left of the first row's window are never reached
            kb1 = min(max(start - window + 1, 0) // BN, nb1)
            lo = max(lo, start - window + 1)
        kb2 = max(nb1, lo // BN)
        n_cand = nb1 - kb1 + max(0, n_kb - kb2)
    has_dyn = dyn is not None or extra is not None
    n_kd = 0
    if extra is not None:
        assert dyn is None and dyn_block % BN == 0
        dyn_t, extra_idx, extra_num, max_extra = extra
        n_kd = dyn_t.shape[2]
    elif has_dyn:
        assert dyn_block % BN == 0 and dyn.shape[:2] == (B, H)
        n_kd = dyn.shape[2]
        n_kb = triton.cdiv(Sk, BN)
        f = dyn_block // BN
        # The key blocks (of BN) some head of each kv group selected, minus the static candidates.
        union = dyn.reshape(B, H_kv, G, n_kd).any(2).repeat_interleave(f, dim=-1)[..., :n_kb]
        idx = torch.arange(n_kb, device=q.device)
        # The window's first block; under `valid_len` computed on the device as the kernel does
        # (the host `kb2` passed to the kernel is then only a placeholder).
        win = (torch.clamp(torch.clamp(valid_len.reshape(()) - Sq - L + 1, min=L) // BN, min=nb1)
               if device_pos else kb2)
        extra = union & (idx >= nb1) & (idx < win)
        max_extra = max(1, min(int(max_extra) if max_extra else n_kb, n_kb))
        extra_num = extra.sum(-1, dtype=torch.int32).reshape(B * H_kv)
        order = torch.sort(extra.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :max_extra]
        extra_idx = order.to(torch.int32).reshape(B * H_kv, max_extra).contiguous()
        dyn_t = dyn.to(torch.uint8).contiguous()
    else:
        dyn_t = extra_idx = extra_num = q  # unused pointers
        max_extra = 0
    want = programs_wanted(q.device)
    n_total = n_cand + max_extra
    kbw = 0
    if full is not None:
        assert full.shape == (H,) and full.dtype == torch.uint8 and full.device == q.device
        if window is not None and not device_pos:
            kbw = max(start - window + 1, 0) // BN
        n_sweep = triton.cdiv(Sk, BN) - kbw  # a full group's sweep (the cache's slots)
        if full_groups is None:
            full_groups = int(full.view(H_kv, G).any(1).sum())
        n_total = max(n_total, n_sweep)
        # The sweeps take the time: split them so that they alone make FULL_SWEEP_PROGRAMS x want programs.
        per_split = max(1, triton.cdiv(n_sweep * B * max(1, full_groups), FULL_SWEEP_PROGRAMS * want),
                        triton.cdiv(n_total, MAX_SPLITS))
    else:
        per_split = max(1, triton.cdiv(n_total * B * H_kv, want))
    n_splits = triton.cdiv(n_total, per_split)
    o_part = torch.empty(B * H_kv, n_splits, BLOCK_R, BD, device=q.device, dtype=torch.float32)
    ml_part = torch.empty(B * H_kv, n_splits, 2, BLOCK_R, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale, cap_in, cap_out = softcap_args(scale, softcap)
    _dam_decode_split_kernel[(n_splits, B * H_kv)](
        q, k, v, masks.mask_words, masks.offset_words, masks.columns, o_part, ml_part,
        valid_len if device_pos else o_part, dyn_t, extra_idx, extra_num, q if full is None else full,
        qk_scale, start, Sq, Sk, L, masks.mask_words.shape[-1], H_kv, G,
        kb1, nb1, kb2, n_cand, per_split, n_splits, n_kd, max(1, dyn_block), max_extra,
        window or 0, cap_in, cap_out, kbw,
        *q.stride(), *k.stride(), *v.stride(),
        BLOCK_R=BLOCK_R, BLOCK_N=BN, HEAD_DIM=D, BLOCK_D=BD, DOT_PRECISION=prec, DEVICE_POS=device_pos,
        HAS_DYN=has_dyn, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_FULL=full is not None, num_warps=num_warps, num_stages=2,
    )
    _dam_decode_combine_kernel[(B * H_kv, G * Sq)](
        o_part, ml_part, out, Sq, H_kv, G, n_splits, *out.stride(),
        BLOCK_R=BLOCK_R, HEAD_DIM=D, BLOCK_D=BD, SPLITS=max(16, min(64, 4096 // BD)), num_warps=4,
    )
    return out
