"""The dynamic part of DAM attention (beyond the paper, off by default): per query block, the
top-k key blocks by a cheap pooled q.k estimate, united with the static Stage-2 mask.

Blocks are aligned to absolute positions: query block `qb` holds positions
`[qb*B, (qb+1)*B)`, key block `kb` holds `[kb*B, (kb+1)*B)`. For the query rows present in a
call, the pooled query of a block is the mean of its present rows; the pooled key of a block is
the mean of its keys, and a block's score is the pooled query's dot product with it (`score`
"mean", the default). With `score` "bound" a block's score is instead an upper bound on the
pooled query's dot product with each of its keys, from the block's elementwise key maximum and
minimum: `sum_d max(qbar_d * kmax_d, qbar_d * kmin_d)`, i.e. `relu(qbar) . kmax + min(qbar, 0) . kmin`
(the page bound of Quest, Tang et al. 2024, there per decoded token). One key that stands out
(a hidden passkey, say) then ranks its block high, where the mean dilutes it over the block.
Candidates are the blocks strictly before the query block (`kb < qb`, so
every pair in them is causal); the `k` best by score are selected (ties to the lower block
index), and a selected block allows all its pairs. The query's own block keeps the static mask
(with the diagonal guard). With `k` at least the number of earlier blocks, the result is the
static mask united with every earlier block.

With `tail_mass` = gamma (the exact-mass rule), the call's last query block (the prompt's question,
every decode step) is chosen otherwise: its own rows' exact softmax attention (scale q.k over every
causal key) is summed per key block and averaged over the rows and kept per head; the own block's
mass counts as kept, then earlier blocks join by decreasing mass (ties to the lower index) while the
mass left out exceeds `1 - gamma` of the total, at most the tail budget of them. Other query blocks
keep the pooled rule, or with `score` "antidiag" are chosen by the same rule on an estimate of their mass:
XAttention's antidiagonal sample, one key in `ANTIDIAG_STRIDE` per row (`block_mass.antidiag_select`; at
most `topk` blocks each); with "antisum", XAttention's own estimate, each `ANTISUM_STRIDE`-row group's
antidiagonal summed before the softmax (`block_mass.antisum_select`, on the CPU about half the cost). On varied
text the pooled mean of 64 keys dilutes the few tokens a query needs
(a hidden code): the estimate keeps the softmax's sharpness (docs/results/accuracy.md).

In a sliding-window layer (`window` = W) both rules stay inside the layer's own attention: candidates are
the earlier blocks that the window of the query block's first row reaches, and the exact mass is each row's
softmax over the keys in its window (keys further left are not read: their mass is 0, so they are never
chosen). A selected block is still cut to each row's window where the attention applies the mask. There
"antidiag" and "antisum" fall back to the pooled mean: a window of a few blocks leaves few candidates to rank.

Pure torch; the Triton kernels receive the selection as extra "full" blocks, the reference as
extra mask cells, so both compute exactly the same mask. `DynamicSelection` (`selection.py`, re-exported
here) holds the settings (top-k, block, tail top-k, score, tail mass) as one value.
"""

from __future__ import annotations

import torch

from .pair_counts import static_block_counts, union_pair_counts  # noqa: F401  (the density probe's counts)
from .selection import ANTIDIAG_STRIDE, ANTISUM_STRIDE, MASS_SCORES, SCORES, DynamicSelection  # noqa: F401


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown block score {score!r}: choose one of {', '.join(SCORES)}")


def select_blocks(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    start: int,
    topk: int,
    block: int,
    tail_topk: int | None = None,
    score: str = "mean",
    tail_mass: float | None = None,
    scale: float | None = None,
    window: int | None = None,
    mass: float | None = None,
) -> torch.Tensor:
    """Selected key blocks per query block: bool `[B, H, nQ, nK]` over absolute block indices.

    `topk` <= 0 selects nothing. `tail_topk` (default `topk`): the budget of the call's last
    query block instead (the end of a prompt, where the question sits). `score`: "mean" (pooled
    key) or "bound" (upper bound from the block's key maximum and minimum), see the module doc.
    `tail_mass` (None: off): that last block by the exact-mass rule (module doc) with the attention
    `scale` (default `D ** -0.5`). `mass` (None: `tail_mass`): with a mass score, the share of its estimate
    the other query blocks keep.

    `nQ = ceil((start + Sq) / block)`, `nK = ceil(Sk / block)`; query blocks with no row in this
    call select nothing. `window` (a sliding-window layer): candidates are the earlier blocks the window
    of the block's first row in this call reaches, and the exact mass counts only keys in the rows' windows.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    _check_score(score)
    if score in MASS_SCORES:
        if window is None:  # by estimated mass (a sliding-window layer's few candidates: the mean rule below)
            from .block_mass import antidiag_select, antisum_select

            rule, stride = ((antidiag_select, ANTIDIAG_STRIDE) if score == "antidiag"
                            else (antisum_select, ANTISUM_STRIDE))
            return rule(q, k, start, block, tail_mass if mass is None else mass, topk, stride=stride, scale=scale,
                        tail_mass=tail_mass, tail_cap=tail_topk)
        score = "mean"
    nQ = -(-(start + Sq) // block)
    nK = -(-Sk // block)
    kfeat = _key_features(k, block, score)  # [B, H_kv, nK, D or 2D]
    # Pooled queries over the rows present in this call.
    pos = torch.arange(start, start + Sq, device=q.device)
    qb_of = pos // block  # [Sq]
    qsum = torch.zeros(B, H, nQ, D, device=q.device, dtype=torch.float32)
    qsum.index_add_(2, qb_of, q.float())
    qcount = torch.zeros(nQ, device=q.device, dtype=torch.float32).index_add_(0, qb_of, torch.ones(Sq, device=q.device))
    present = qcount > 0
    qbar = _query_features(qsum / qcount.clamp(min=1)[:, None], score)
    scores = torch.matmul(qbar.reshape(B, H_kv, G, nQ, -1), kfeat.unsqueeze(2).transpose(-1, -2))
    scores = scores.reshape(B, H, nQ, nK)
    qi = torch.arange(nQ, device=q.device)[:, None]
    ki = torch.arange(nK, device=q.device)[None, :]
    k_of = topk
    if tail_topk is not None and tail_topk != topk:  # a per-query-block budget
        k_of = torch.full((nQ, 1), topk, device=q.device, dtype=torch.long)
        k_of[(start + Sq - 1) // block] = tail_topk
    chosen = _top_earlier(scores, _candidates(qi, ki, torch.clamp(qi * block, min=start), block, window), k_of)
    chosen &= present[:, None]
    if tail_mass is not None:
        qt = (start + Sq - 1) // block  # the tail block; its rows in this call from r0 on
        r0 = max(0, qt * block - start)
        mass = tail_block_mass(q[:, :, r0:], k, start + r0, block, scale, window=window)
        chosen[:, :, qt] = mass_select(mass, qt, tail_mass, topk if tail_topk is None else tail_topk)
    return chosen


# float32 attention scores held at once by `tail_block_mass_reference` (256 MiB); more kv heads are done in turn.
MASS_CHUNK_ELEMENTS = 1 << 26


def tail_block_mass(q: torch.Tensor, k: torch.Tensor, first, block: int, scale: float | None = None,
                    window: int | None = None) -> torch.Tensor:
    """Exact attention mass per key block of the rows q `[B, H, r, D]` at positions `first .. first + r - 1` over
    keys k `[B, H_kv, Sk, D]`: float32 `[B, H, ceil(Sk / block)]`, each row's softmax of `scale` q.k over its causal
    keys (within its `window`, if given: the layer's own attention) summed per block, averaged over the rows.
    `first`: an int, or a 0-d tensor on the device (a static cache: slots past the row are masked, even NaN ones;
    nothing is read on the host). With a window, keys before the first row's window are not read (mass 0). On CUDA
    with an int `first`: the Triton kernel `dam_kernels.tail_mass`; else `tail_block_mass_reference`."""
    from . import tail_mass

    if tail_mass.supports(q, first):
        return tail_mass.tail_block_mass(q, k, first, block, scale, window=window)
    return tail_block_mass_reference(q, k, first, block, scale, window)


def tail_block_mass_reference(q: torch.Tensor, k: torch.Tensor, first, block: int, scale: float | None = None,
                              window: int | None = None) -> torch.Tensor:
    """`tail_block_mass` in PyTorch (the kernel's reference): float32 scores, `MASS_CHUNK_ELEMENTS` at a time over kv
    heads; a window's keys sliced off for an int `first`, a fixed-width span gathered for a device-side one."""
    B, H, r, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    nK = -(-Sk // block)
    a = reach_start(first, window, block)  # whole blocks before it hold no key any row reaches
    a_dev = None
    if a:
        k, first = k[:, :, a:], first - a
        Sk -= a
    elif window is not None and not isinstance(first, int):
        # A device-side position (a static cache under a CUDA graph): a span of fixed width from the first
        # row's window on, gathered on the device; slots past the cache repeat its last one, and being later
        # than every row they are masked like the unfilled slots.
        width = -(-(window + block + r - 1) // block) * block
        if width < Sk:
            a_dev = torch.clamp(first - window + 1, min=0) // block * block
            k = k.index_select(2, (a_dev + torch.arange(width, device=k.device)).clamp_(max=Sk - 1))
            first, Sk = first - a_dev, width
    step = max(1, MASS_CHUNK_ELEMENTS // (B * max(G * r, D) * Sk))
    parts = []
    for h0 in range(0, H_kv, step):
        h1 = min(H_kv, h0 + step)
        s = mass_scores(q[:, h0 * G : h1 * G], k[:, h0:h1], scale)
        parts.append(scores_block_mass(s, first, block, r, window).reshape(B, (h1 - h0) * G, -1))
    mass = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if a_dev is not None:  # the span's blocks back in place (blocks past the cache hold no mass)
        at = (a_dev // block + torch.arange(mass.shape[-1], device=mass.device)).clamp_(max=nK - 1)
        return torch.zeros(B, H, nK, device=mass.device, dtype=mass.dtype).index_add_(2, at, mass)
    return torch.nn.functional.pad(mass, (nK - mass.shape[-1], 0)) if a else mass


def reach_start(first, window: int | None, block: int) -> int:
    """The first key position, rounded down to a multiple of `block`, that the window of a row at `first` (an
    int) reaches: 0 without a window or with a device-side `first`."""
    if window is None or not isinstance(first, int):
        return 0
    return max(0, first - window + 1) // block * block


def _candidates(qi: torch.Tensor, ki: torch.Tensor, first_row, block: int, window: int | None) -> torch.Tensor:
    """Candidate key blocks `ki` of query blocks `qi` (broadcast): strictly earlier blocks, and with `window` only
    those the window of the query block's first row `first_row` (broadcast like `qi`) reaches."""
    earlier = ki < qi
    return earlier if window is None else earlier & (ki * block + block - 1 > first_row - window)


def mass_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 `scale` q.k of rows q `[B, H, r, D]` over keys k `[B, H_kv, Sk, D]`, the G query heads of a kv
    head stacked: `[B, H_kv, G * r, Sk]` (what `tail_block_mass` computes, for callers that reuse the scores).
    On a GPU with 2-byte inputs the float32 product runs on TF32 tensor cores: TF32 keeps 10 mantissa bits and
    float32's exponent, so every bf16 or fp16 value passes unrounded and each product is the float32 one
    (accumulated in float32 as before; only the order of the sums may differ)."""
    B, H, r, D = q.shape
    qf, kf = q.float().reshape(B, k.shape[1], -1, D), k.float().transpose(-1, -2)
    if not (q.is_cuda and q.element_size() == 2 and k.element_size() == 2):
        return torch.matmul(qf, kf).mul_(scale)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.matmul(qf, kf).mul_(scale)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def scores_block_mass(s: torch.Tensor, first, block: int, r: int, window: int | None = None) -> torch.Tensor:
    """`tail_block_mass` from `mass_scores` `[B, H_kv, G * r, Sk]` of `r` rows at positions `first ..` (an int
    or a 0-d device tensor), which it overwrites: float32 `[B, H_kv, G, ceil(Sk / block)]`."""
    B, H_kv, Gr, Sk = s.shape
    nK = -(-Sk // block)
    s = s.view(B, H_kv, Gr // r, r, Sk)
    rows = first + torch.arange(r, device=s.device)
    later = torch.arange(Sk, device=s.device)[None, :] > rows[:, None]  # [r, Sk]: not causal
    lo = first + 1 if isinstance(first, int) else 0  # keys before lo are causal for every row
    s[..., lo:].masked_fill_(later[:, lo:], float("-inf"))
    if window is not None:  # keys left of a row's window: outside the layer's attention
        hi = max(0, min(Sk, first + r - window)) if isinstance(first, int) else Sk  # keys from hi on: in every window
        far = torch.arange(hi, device=s.device)[None, :] <= rows[:, None] - window
        s[..., :hi].masked_fill_(far, float("-inf"))
    # In place, no copy of the scores: exp(s - max) per row, then the mean over the rows of each row's
    # softmax as one product with the weights 1 / (r * sum), so each key gets its mean probability.
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    w = s.sum(-1, keepdim=True).mul_(r).reciprocal_()
    p = torch.nn.functional.pad(torch.matmul(w.transpose(-1, -2), s).squeeze(-2), (0, nK * block - Sk))
    return p.reshape(B, H_kv, Gr // r, nK, block).sum(-1)


def mass_select(mass: torch.Tensor, qb, gamma: float, cap: int) -> torch.Tensor:
    """Blocks before `qb` (an int or a 0-d device tensor) chosen from block masses `[..., nK]`: bool like it.

    The own block's mass counts as kept; earlier blocks join by decreasing mass (ties to the lower index)
    while the mass still left out exceeds `1 - gamma` of the total, at most `cap`; blocks of mass 0 never.
    """
    nK = mass.shape[-1]
    ki = torch.arange(nK, device=mass.device)
    if isinstance(qb, torch.Tensor):
        own = mass.gather(-1, qb.reshape(1).expand(*mass.shape[:-1], 1))
    else:
        own = mass[..., qb : qb + 1]
    ms, order = torch.sort(mass.masked_fill(ki >= qb, -1.0), dim=-1, descending=True, stable=True)
    left = ms.clamp(min=0).flip(-1).cumsum(-1).flip(-1)  # mass of this block and every lighter candidate
    keep = (left > (1 - gamma) * (own + left[..., :1])) & (ki < cap)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _reduce_block(keys: torch.Tensor, dim: int, score: str) -> torch.Tensor:
    """float32 summary of the keys along `dim` (kept, size 1): their sum ("mean") or their
    elementwise maximum then minimum ("bound", `2 D` wide). No float copy of the keys."""
    if score == "mean":
        return keys.sum(dim, keepdim=True, dtype=torch.float32)
    return torch.cat([keys.amax(dim, keepdim=True), keys.amin(dim, keepdim=True)], dim=-1).float()


def block_summary(k: torch.Tensor, block: int, score: str = "mean") -> torch.Tensor:
    """What the selection keeps of every key block (the last one may be short), float32: for
    "mean" the sum of its keys `[B, H_kv, nK, D]`, for "bound" its elementwise maximum then
    minimum `[B, H_kv, nK, 2D]`. Reads the keys in place (no float copy of the cache)."""
    _check_score(score)
    B, H_kv, Sk, D = k.shape
    n_whole = Sk // block
    parts = []
    if n_whole:
        whole = k[:, :, : n_whole * block].reshape(B, H_kv, n_whole, block, D)
        parts.append(_reduce_block(whole, 3, score).squeeze(3))
    if n_whole * block < Sk:
        parts.append(_reduce_block(k[:, :, n_whole * block:], 2, score))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def update_block_summary(summary: torch.Tensor, k: torch.Tensor, valid_len: torch.Tensor, block: int,
                         score: str = "mean") -> None:
    """Recompute, in place, the summary of the block holding the last filled slot of a static cache.

    `summary` from `block_summary` with the same `score` over the whole buffer `k`
    (`[B, H_kv, slots, D]`, slots a multiple of `block`); `valid_len` a one-element tensor on the
    device. One block is read, nothing on the host: a decode step captured in a CUDA graph keeps
    the summary of every completed block exact this way (each block is recomputed at every step
    while it fills, so it is whole once passed; its unfilled slots count only while it fills, and
    a filling block is never a candidate).
    """
    _check_score(score)
    qb = (valid_len.reshape(1) - 1) // block  # [1] on the device
    idx = qb * block + torch.arange(block, device=k.device)
    summary.index_copy_(2, qb, _reduce_block(k.index_select(2, idx), 2, score))


def _key_features(k: torch.Tensor, block: int, score: str, summary: torch.Tensor | None = None) -> torch.Tensor:
    """Per key block, the vector a pooled query's features are dotted with (float32)."""
    if score == "bound":
        return summary if summary is not None else block_summary(k, block, "bound")
    if summary is not None:  # sums of whole blocks (a static cache's candidates)
        return summary / block
    return _pooled_keys(k, block)


def _query_features(qbar: torch.Tensor, score: str) -> torch.Tensor:
    """"mean": the pooled query; "bound": its positive then negative part (so that one dot
    product with [kmax, kmin] gives the bound)."""
    if score == "bound":
        return torch.cat([qbar.clamp(min=0), qbar.clamp(max=0)], dim=-1)
    return qbar


def _pooled_keys(k: torch.Tensor, block: int) -> torch.Tensor:
    """Mean key of every key block (the last one may be short): float32 `[B, H_kv, nK, D]`."""
    Sk = k.shape[2]
    nK = -(-Sk // block)
    # Keys per block, made on the device (no host copy: the call may be captured in a CUDA graph).
    kcount = torch.clamp(Sk - torch.arange(nK, device=k.device) * block, max=block).float()
    return block_summary(k, block) / kcount[:, None]


def _top_earlier(scores: torch.Tensor, causal: torch.Tensor, topk) -> torch.Tensor:
    """bool like `scores`: the `topk` best key blocks (last axis) among the `causal` ones, ties to
    the lower block index. `topk`: an int, or a tensor broadcast against `scores` (per query block)."""
    nK = scores.shape[-1]
    scores = scores.masked_fill(~causal, float("-inf"))
    # Stable order: best score first, the lower block index first among equals.
    order = torch.sort(-scores, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nK, device=scores.device).expand_as(order).contiguous())
    return (rank < topk) & causal


def dynamic_rows(chosen: torch.Tensor, rows: torch.Tensor, n_keys: int, block: int) -> torch.Tensor:
    """Cells allowed by the selected blocks for the given absolute rows: bool `[B, H, n, n_keys]`."""
    i = rows.to(chosen.device)[:, None]
    j = torch.arange(n_keys, device=chosen.device)[None, :]
    cells = chosen[:, :, (i // block).expand(-1, n_keys), (j // block).expand(len(rows), -1)]
    return cells & (j <= i)


def merge_layout(layout, chosen: torch.Tensor, block: int):
    """A BlockLayout whose full blocks also hold the selected ones (one batch row).

    chosen bool `[H, nQ, nKd]` in blocks of `block`; the layout's query blocks must be `block`
    rows and its key blocks must divide `block`. A selected block becomes full (all its pairs
    are causal and allowed) and leaves the partial list. Lists stay ascending, padded with 0.

    Works on the index lists (a row's few static blocks and its at most `cap` selected ones), never on
    `[H, nQ, nK]` maps of the layout: at 131,072 tokens those are 134M entries a layer.
    """
    from .layout import BlockLayout

    BM, BN = layout.block_m, layout.block_n
    assert BM == block and block % BN == 0
    f = block // BN
    H, nQ = layout.kv_num_blocks.shape
    nK = layout.n_kv_blocks
    dev = layout.kv_indices.device
    big = torch.iinfo(torch.int64).max
    ch = chosen.to(dev)[:, :nQ]
    if ch.shape[1] < nQ:
        ch = torch.nn.functional.pad(ch, (0, 0, 0, nQ - ch.shape[1]))
    # the selected blocks of each row, ascending, in the layout's key blocks (BIG where none)
    n_sel = ch.sum(-1)
    width = int(n_sel.max()) if n_sel.numel() else 0
    if width:  # nonzero lists (head, query block, key block) in that order: each row's blocks ascending
        hq_k = ch.nonzero()
        row = hq_k[:, 0] * nQ + hq_k[:, 1]
        first = n_sel.flatten().cumsum(0) - n_sel.flatten()  # each row's first entry in the list
        sel = torch.full((H * nQ, width), big, dtype=torch.int64, device=dev)
        sel[row, torch.arange(len(row), device=dev) - first[row]] = hq_k[:, 2]
        sel = sel.view(H, nQ, width)
        if f > 1:
            sel = torch.where(sel[..., None] == big, big, sel[..., None] * f + torch.arange(f, device=dev)).flatten(-2)
        sel = torch.where(sel < nK, sel, big)
    else:
        sel = torch.full((H, nQ, 0), big, dtype=torch.int64, device=dev)

    def listed(num, idx):  # a layout's list as int64 with BIG past each row's count
        ok = torch.arange(idx.shape[-1], device=dev) < num[..., None].long()
        return torch.where(ok, idx.long(), big)

    part = listed(layout.kv_num_blocks, layout.kv_indices)
    full = listed(layout.full_kv_num_blocks, layout.full_kv_indices)
    if sel.shape[-1]:  # a partial block that was selected leaves the partial list
        part = torch.where((part[..., :, None] == sel[..., None, :]).any(-1), big, part)
    full = torch.cat([full, sel], -1).sort(-1).values
    if full.shape[-1] > 1:  # a selected block already full once
        dup = (full[..., 1:] == full[..., :-1]) & (full[..., 1:] != big)
        full = torch.cat([full[..., :1], torch.where(dup, big, full[..., 1:])], -1)
    part, full = part.sort(-1).values, full.sort(-1).values
    p_num, f_num = (part != big).sum(-1), (full != big).sum(-1)
    n_part, n_full = int(p_num.sum()), int(f_num.sum())
    wp, wf = max(1, int(p_num.max()) if p_num.numel() else 0), max(1, int(f_num.max()) if f_num.numel() else 0)

    def padded(x, w):  # BIG -> 0, cut to w, int32
        x = torch.nn.functional.pad(x, (0, max(0, w - x.shape[-1])), value=big)[..., :w]
        return torch.where(x == big, 0, x).to(torch.int32).contiguous()

    i32 = torch.int32
    return BlockLayout(p_num.to(i32).contiguous(), padded(part, wp), f_num.to(i32).contiguous(), padded(full, wf),
                       layout.length, BM, BN, n_part / max(1, n_part + n_full))


def select_blocks_one(
    q: torch.Tensor,  # [B, H, Sq, D], every row in one query block
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    start: int,
    topk: int,
    block: int,
    valid_len: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
    score: str = "mean",
    tail_mass: float | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """`select_blocks` for a call whose rows all sit in one query block (a decode step).

    Returns bool `[B, H, nK]`: the selection of that query block, the same as
    `select_blocks(q, k, start, topk, block)[:, :, start // block]`, without the `nQ x nK`
    score matrix.

    `valid_len` (a one-element tensor on q's device) makes k a static cache whose first
    `valid_len` slots are filled (`start` is then ignored, and Sq must be 1): the query block is
    computed on the device, so the call can be captured in a CUDA graph. Only blocks before the
    query block are candidates, and those are filled, so the unfilled slots never count.
    `sums` (with `valid_len`): the block summaries kept up to date by `update_block_summary`
    with the same `score` (sums for "mean", maxima and minima for "bound"), used instead of
    reading every key (candidate blocks are whole, so their mean is the sum over `block`).
    `tail_mass` (None: off): the block is the call's last, chosen by the exact-mass rule with cap `topk`
    and attention `scale` (module doc; `sums` unused, every filled key read). `window` as in `select_blocks`.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    if valid_len is not None:
        assert Sq == 1, "a device-side position takes one row"
        qb = (valid_len.reshape(()) - 1) // block  # 0-d tensor on the device
    else:
        qb = start // block
        assert (start + Sq - 1) // block == qb, "rows span two query blocks"
    _check_score(score)
    first = valid_len.reshape(()) - 1 if valid_len is not None else start
    if tail_mass is not None:
        return mass_select(tail_block_mass(q, k, first, block, scale, window=window), qb, tail_mass, topk)
    nK = -(-Sk // block)
    kfeat = _key_features(k, block, score, sums)  # [B, H_kv, nK, D or 2D]
    qsum = torch.zeros(B, H, 1, D, device=q.device, dtype=torch.float32)
    qsum.index_add_(2, torch.zeros(Sq, dtype=torch.long, device=q.device), q.float())
    qbar = _query_features(qsum / float(Sq), score)
    scores = torch.matmul(qbar.reshape(B, H_kv, G, 1, -1), kfeat.unsqueeze(2).transpose(-1, -2)).reshape(B, H, nK)
    return _top_earlier(scores, _candidates(qb, torch.arange(nK, device=q.device), first, block, window), topk)
